"""ipqs-bulkd: a folder-driven submission queue for the IPQualityScore Bulk CSV API."""

__version__ = "0.1.0"

#: Every file type the IPQS Bulk CSV API accepts (the OpenAPI enum).
ALL_TYPES = (
    "proxy",
    "email",
    "phone",
    "url",
    "leaked_email",
    "leaked_password",
    "leaked_username",
)
