"""The serving side: `services.inference` (KServe v2 over onnxruntime) and `services.gateway` (the cxr.v1 API).

Nothing under `services` imports torch or `training`.
"""
