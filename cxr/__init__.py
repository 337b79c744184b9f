"""cxr: chest X-ray classification served over gRPC.

The `cxr` package is the ground floor shared by training and the services: the image reader
(`cxr.imaging`), the model repository format (`cxr.repository`), the generated protobuf code
(`cxr.generated`) and the command-line entry point (`cxr.cli`). It imports neither torch nor
`training` nor `services`.
"""

__version__ = "0.1.0"

NOT_FOR_CLINICAL_USE = "Research software: not for clinical use. Not a medical device."
