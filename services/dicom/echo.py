"""C-ECHO a DICOM node: `python -m services.dicom.echo HOST:PORT [CALLED_AE] [CALLING_AE]` (the image's health check).

Exit 0 when the association is accepted and the echo answers success, 1 otherwise. The called AE title defaults to
the node's (CXR_DICOM_AE_TITLE); the calling one to the first of CXR_DICOM_ALLOW_AE when that is set (the node
accepts no other), else the node's own.
"""

from __future__ import annotations

import os
import sys


def echo(host: str, port: int, called: str, calling: str, timeout: float = 5.0) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return getattr(status, "Status", None) == 0x0000
    finally:
        assoc.release()


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3, 4) or ":" not in argv[1]:
        print("usage: python -m services.dicom.echo HOST:PORT [CALLED_AE] [CALLING_AE]", file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    own = os.environ.get("CXR_DICOM_AE_TITLE", "CXR")
    called = argv[2] if len(argv) > 2 else own
    allowed = [a.strip() for a in os.environ.get("CXR_DICOM_ALLOW_AE", "").split(",") if a.strip()]
    calling = argv[3] if len(argv) > 3 else (allowed[0] if allowed else own)
    ok = echo(host, int(port), called, calling)
    print(f"{argv[1]}: {'C-ECHO success' if ok else 'C-ECHO failed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
