"""The DICOM node (`cxr serve dicom`): a C-STORE SCP that spools what a PACS sends, classifies each instance
through the gateway's gRPC API, and sends the results back into the study as DICOM objects (SR + Secondary
Capture) by C-STORE and/or STOW-RS. It never classifies by itself. Research software: not for clinical use."""
