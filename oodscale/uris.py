"""Credentials stay out of locations: a URI with user info (`s3://KEY:SECRET@bucket`) or a key
in its query (`?secret_key=…`) is refused where the config is read, because the config is shown
(report.html, MLflow params, cards, error messages) and travels to every Ray worker."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from oodscale.errors import InputError

# query keys that pyarrow (S3: access_key, secret_key, session_token; GCS: access_token) and
# other clients take as credentials
SECRET_QUERY_KEYS = frozenset({"access_key", "secret_key", "session_token", "access_token",
                               "token", "password"})
WHERE_CREDENTIALS_GO = (
    "credentials go in the environment, not in a URI: AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (or an instance role) for s3://, GOOGLE_APPLICATION_CREDENTIALS for "
    "gs://, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN for "
    "MLflow, RAY_AUTH_TOKEN for a Ray cluster; on Kubernetes from a Secret "
    "(manifests/base/secret.example.yaml)")


def credential_in(location: str, address: bool = False) -> str | None:
    """What kind of credential `location` holds ("user info", "a secret_key query key"), or
    None. A local path (no `scheme://`) holds none: `@` is a legal character there. An
    `address` (a Ray address: `host:port`, `ray://host:port`) is read as one even without a
    scheme."""
    if "://" not in location:
        if not address:
            return None
        location = f"//{location}"
    try:
        parts = urlsplit(location)
    except ValueError:
        return None  # not a URI: the reader says what is wrong with it
    if "@" in parts.netloc:
        return "user info (`user:password@`)"
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in SECRET_QUERY_KEYS:
            return f"a `{key}` query key"
    return None


def refuse_credentials(location: str | None, address: bool = False) -> str | None:
    """`location` itself, or ValueError (which does not repeat it) when it holds a credential."""
    if location is not None:
        found = credential_in(location, address)
        if found:
            raise InputError(f"holds {found}; {WHERE_CREDENTIALS_GO}")
    return location
