"""Credentials out of everything nptm shows or stores: one redaction of URIs and of text that
holds them, and the check that refuses a storage URI that carries credentials.

A URI's user-info (``s3://KEY:SECRET@bucket/...``, ``http://alice:PW@host``) and its secret
query parameters (``?secret_key=...``, ``X-Amz-Signature=...``, ``sig=...``) are replaced by
``***``: ``s3://***@bucket/...``, ``http://alice:***@host``, ``?secret_key=***``. Everything
else (scheme, host, port, path, the other query options) stays, so a redacted URI still says
where things are.

Torch-free and Ray-free: the driver, Tune's trial actors and the results package import it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"

# Object stores: the user-info is an access key (and its secret), masked as a whole. Web URIs:
# a user name with a password is shown (``alice:***``), a user name alone is masked (it is
# often a token). Elsewhere (postgresql://, mysql://, hdfs://) a user name alone is shown.
_OBJECT_STORES = frozenset(
    {"s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "az", "wasb", "wasbs", "oss"}
)
_WEB = frozenset({"http", "https", "ws", "wss", "mlflow-artifacts"})
# A query parameter is secret when its name (lower case, '-' as '_') is one of these or
# contains one of the words: AWS/pyarrow (access_key, secret_key, session_token), presigned
# URLs (X-Amz-Credential, X-Amz-Signature, X-Amz-Security-Token), Azure SAS (sig), API keys.
_SECRET_NAMES = frozenset({"sig", "pwd", "pass", "key", "code"})
_SECRET_WORDS = (
    "secret", "token", "password", "passwd", "credential", "signature", "access_key",
    "accesskey", "api_key", "apikey", "private_key",
)  # fmt: skip

_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>.*)$", re.S)
# A URI inside free text (a log line, an error message): up to whitespace or a quote.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_TRAILING = ".,;:)]}"


def is_secret_param(name: str) -> bool:
    """Whether a URI query parameter of this name carries a credential."""
    key = unquote(name).strip().lower().replace("-", "_")
    return key in _SECRET_NAMES or any(word in key for word in _SECRET_WORDS)


def _split(uri: str) -> tuple[str, str, str, str, str] | None:
    """(scheme, user-info, host and path, query, fragment) of `uri`, or None when it is not
    a ``scheme://`` URI. The user-info ends at the last '@' of the authority; a password with
    an unencoded '/' (AWS secret keys have them) still counts as one when an '@' follows it
    before the query and the authority's "port" is no number."""
    match = _URI.match(uri)
    if match is None:
        return None
    scheme, rest = match.group("scheme"), match.group("rest")
    rest, hash_, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    end = rest.find("/")
    end = len(rest) if end < 0 else end
    authority = rest[:end]
    userinfo = ""
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        rest = host + rest[end:]
    elif "@" in rest and ":" in authority and not authority.rpartition(":")[2].isdigit():
        userinfo, _, rest = rest.rpartition("@")
    return scheme, userinfo, rest, qmark + query, hash_ + fragment


def _redact_userinfo(scheme: str, userinfo: str) -> str:
    if not userinfo:
        return ""
    scheme = scheme.lower()
    user, colon, _ = userinfo.partition(":")
    if scheme in _OBJECT_STORES or (scheme in _WEB and not colon):
        return f"{MASK}@"
    return f"{user}:{MASK}@" if colon else f"{userinfo}@"


def _redact_query(query: str) -> str:
    if not query:
        return ""
    parts = re.split(r"([&;])", query[1:])
    for i in range(0, len(parts), 2):
        name, eq, _ = parts[i].partition("=")
        if eq and is_secret_param(name):
            parts[i] = f"{name}={MASK}"
    return "?" + "".join(parts)


def redact_uri(uri: str | None) -> str | None:
    """`uri` with its user-info and secret query parameters masked (see the module
    docstring); anything that is not a ``scheme://`` URI (a local path, None) as given."""
    if not uri:
        return uri
    parts = _split(str(uri))
    if parts is None:
        return uri
    scheme, userinfo, rest, query, fragment = parts
    return f"{scheme}://{_redact_userinfo(scheme, userinfo)}{rest}{_redact_query(query)}{fragment}"


def redact_text(text: str) -> str:
    """`text` (a message, a log line) with every URI in it redacted."""

    def one(match: re.Match[str]) -> str:
        found = match.group(0)
        kept = found.rstrip(_TRAILING)
        return redact_uri(kept) + found[len(kept) :]

    return _URI_IN_TEXT.sub(one, text)


def uri_credentials(uri: str | None) -> list[str]:
    """What credentials `uri` carries, in words (empty: none): its user-info (a password, or
    any user-info of an object store, a user name alone in a web URI) and each secret query
    parameter."""
    if not uri:
        return []
    parts = _split(str(uri))
    if parts is None:
        return []
    scheme, userinfo, _, query, _ = parts
    found = []
    if userinfo and _redact_userinfo(scheme, userinfo) != f"{userinfo}@":
        found.append("user-info before '@'")
    for part in re.split(r"[&;]", query[1:]) if query else []:
        name, eq, _ = part.partition("=")
        if eq and is_secret_param(name):
            found.append(f"query parameter {unquote(name)!r}")
    return found


def storage_credentials_error(storage: str | None) -> str | None:
    """Why a storage root that carries credentials is refused, or None when it carries none.

    The storage URI reaches every Ray worker (in each trial's runtime settings) and Ray Tune's
    experiment state (``<storage>/_ray/``: the searcher's state, ``tuner.pkl``), beside
    Parquet rows, MLflow and logs: masking it where nptm prints it cannot keep a credential in
    it out of the files Ray and Tune write. Object stores read credentials from the environment
    of each process (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, an AWS
    profile, an instance role; GOOGLE_APPLICATION_CREDENTIALS for gs://), which is where they
    belong.
    """
    found = uri_credentials(storage)
    if not found:
        return None
    scheme = _split(str(storage))[0].lower()  # type: ignore[index]
    if scheme in ("gs", "gcs"):
        where = "GOOGLE_APPLICATION_CREDENTIALS or the node's service account"
    elif scheme.startswith(("abfs", "az", "wasb")):
        where = "the AZURE_STORAGE_* variables or the node's managed identity"
    else:
        where = (
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment, "
            "an AWS profile (AWS_PROFILE, ~/.aws/credentials) or the node's instance role"
        )
    return (
        f"storage {redact_uri(storage)} carries credentials ({', '.join(found)}); nptm refuses "
        "them there, because the storage URI is handed to every Ray worker and kept in Ray "
        "Tune's experiment state under <storage>/_ray/, where they would be written to disk. "
        f"Remove them from the URI and give them through {where}, on this machine and on "
        "every Ray node (a local Ray that nptm starts inherits this shell's environment)"
    )
