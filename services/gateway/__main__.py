"""`python -m services.gateway ...`: the same as `cxr serve gateway ...`."""

import argparse
import sys

from services.gateway import cli

parser = argparse.ArgumentParser(prog="python -m services.gateway", description="the cxr.v1 gRPC gateway")
cli.add_arguments(parser)
sys.exit(cli.run(parser.parse_args()))
