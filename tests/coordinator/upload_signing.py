"""Test helper: signing upload streams as an agent does (the trailer carries the silo's signed upload statement)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fedsilo.privacy import pki
from fedsilo.v1 import federation_pb2


def upload_statement(paths: pki.IssuedPaths, *, run_id: str, silo: str, rnd: int, payload: bytes) -> str:
    """The silo's signed statement of an upload of ``payload`` (what an agent puts in the trailer)."""
    from fedsilo.privacy.upload_statement import sign_upload_statement

    return sign_upload_statement(run_id=run_id, round=rnd, silo=silo, sha256=hashlib.sha256(payload).hexdigest(),
                                 payload_bytes=max(1, len(payload)), certificate_pem=paths.cert.read_bytes(),
                                 private_key_pem=paths.key.read_bytes()).to_json()


def signed(msgs: Iterable[federation_pb2.SubmitUpdateRequest], paths: pki.IssuedPaths, *, run_id: str,
           silo: str) -> list[federation_pb2.SubmitUpdateRequest]:
    """An upload stream whose trailer (if any) carries ``silo``'s statement over the chunks it carries
    (a stream without a header or a trailer is returned unchanged)."""
    out = [federation_pb2.SubmitUpdateRequest.FromString(m.SerializeToString()) for m in msgs]
    head = next((m.header for m in out if m.WhichOneof("part") == "header"), None)
    payload = b"".join(m.chunk for m in out if m.WhichOneof("part") == "chunk")
    for m in out:
        if head is not None and m.WhichOneof("part") == "trailer" and not m.trailer.upload_statement:
            m.trailer.upload_statement = upload_statement(paths, run_id=run_id, silo=silo, rnd=max(1, head.round),
                                                          payload=payload)
    return out
