"""cxr: chest X-ray classification served over gRPC.

The `cxr` package is the ground floor shared by training and the services: the image reader
(`cxr.imaging`), the model repository format (`cxr.repository`), the tensor datatype table and codec
(`cxr.datatypes`), the generated protobuf code (`cxr.generated`) and the command-line entry point (`cxr.cli`).
It imports neither torch nor `training` nor `services`. The version is pyproject.toml's
(`importlib.metadata.version("cxr")`).
"""
