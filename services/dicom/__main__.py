"""`python -m services.dicom ...`: the same as `cxr serve dicom ...`."""

import argparse
import sys

from services.dicom import cli

parser = argparse.ArgumentParser(prog="python -m services.dicom", description="the cxr DICOM node")
cli.add_arguments(parser)
sys.exit(cli.run(parser.parse_args()))
