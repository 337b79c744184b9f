"""Python code generated from proto/ by scripts/gen_proto.py (`make proto`). Do not edit.

cxr.generated.inference: the KServe v2 / Triton protocol; cxr.generated.cxr.v1: the gateway API.
"""
