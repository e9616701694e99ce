"""Audit reports: a silo's or the federation's verified privacy spend, as JSON and HTML."""

from fedsilo.privacy.audit.report import (
    ACCOUNTING,
    AuditError,
    REPORT_FORMAT,
    REPORT_HTML,
    REPORT_JSON,
    THREAT_MODEL,
    VerifyResult,
)
from fedsilo.privacy.audit.disclosures import (
    DISCLOSURES_FILE,
    fedrdn_disclosures,
    resfim_disclosures,
    write_disclosures,
)
from fedsilo.privacy.audit.build import (
    build_report,
    derive_silo_summary,
    report_summary,
    write_report,
)
from fedsilo.privacy.audit.verify import verify_report

__all__ = [
    "ACCOUNTING",
    "REPORT_FORMAT",
    "REPORT_HTML",
    "REPORT_JSON",
    "THREAT_MODEL",
    "AuditError",
    "VerifyResult",
    "DISCLOSURES_FILE",
    "build_report",
    "resfim_disclosures",
    "write_disclosures",
    "derive_silo_summary",
    "report_summary",
    "verify_report",
    "write_report",
]
