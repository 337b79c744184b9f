"""`python -m services.inference ...` is `cxr serve inference ...`."""

import argparse
import sys

from services.inference import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m services.inference", description=__doc__)
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args()))
