"""Can this string reach a process? Checks on everything of a cluster that becomes an argument, an
environment entry, a path, an image reference or an HTTP request line on a node.

The operating system takes C strings: a NUL byte cannot be in one (Python refuses it outright,
"embedded null byte"). Strings reach it as UTF-8, and a lone surrogate (U+D800 to U+DFFF, which
the escapes "\\ud800" in YAML and JSON produce) cannot be encoded at all. Linux refuses a single
argument or environment entry longer than MAX_ARG_STRLEN and a path longer than PATH_MAX.

`manifest.py` applies these checks at the door with the YAML path and line; the node applies them
again (`launch_problem`) before it launches, because what it receives may come from an older
server or its own state file. Each function returns why a value cannot work, or None.
"""

from __future__ import annotations

import re

from vectorlay.core.model import Assignment

# Linux's MAX_ARG_STRLEN (32 pages of 4 KiB) less the terminating NUL: execve(2) answers E2BIG for
# a longer argument or `KEY=VALUE` environment entry.
MAX_ARG_BYTES = 32 * 4096 - 1
MAX_PATH_BYTES = 4096 - 1  # PATH_MAX less the terminating NUL
MAX_NAME_BYTES = 255  # NAME_MAX: one component of a path
MAX_IMAGE_NAME = 255  # registries refuse a longer repository name (distribution/reference)
MAX_IMAGE_REF = MAX_IMAGE_NAME + 1 + 128 + 72  # name, `:tag` (at most 128) and `@sha256:<64 hex>`
# Well under the 8 KiB request line that common HTTP servers accept (nginx, h11 allow more).
MAX_HEALTH_PATH = 2048
# Far beyond any real variable name, and it leaves an entry almost all of MAX_ARG_BYTES for its
# value (a secret's value is only known on the node, and may be 64 KiB).
MAX_ENV_NAME = 1024
MAX_REPLICA_ID = 128  # the server makes `<cluster name>-<5 characters>`: at most 69

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# name[:tag][@digest], each name component lowercase; loose on purpose (registries vary), strict
# enough to refuse spaces, control characters, uppercase names and shell metacharacters.
IMAGE = re.compile(r"(?P<name>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-]{1,2}[a-z0-9]+)*)*)"
                   r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?")
# An HTTP request target: visible ASCII only (RFC 9112 request-target; what h11 sends).
_REQUEST_TARGET = re.compile(r"/[\x21-\x7e]*")
# A replica id is a file name on the node (its log) and part of a container name.
_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def encoding_problem(text: str) -> str | None:
    """A NUL byte or a lone surrogate: no process, environment or path can hold either."""
    if "\x00" in text:
        return "contains a NUL byte (\\0), which no argument, environment variable or path can hold"
    surrogate = _SURROGATE.search(text)
    if surrogate is not None:
        return f"contains U+{ord(surrogate.group()):04X}, a lone surrogate that cannot be encoded as UTF-8"
    return None


def _too_long(text: str, limit: int) -> bool:
    """More than `limit` bytes in UTF-8 (a character takes 1 to 4: encode only when in doubt)."""
    if len(text) > limit:
        return True
    return 4 * len(text) > limit and len(text.encode("utf-8", "surrogatepass")) > limit


def argument_problem(text: str) -> str | None:
    """One element of a command line."""
    if (problem := encoding_problem(text)) is not None:
        return problem
    if _too_long(text, MAX_ARG_BYTES):
        return f"is longer than {MAX_ARG_BYTES} bytes, the most one argument may hold"
    return None


def env_name_problem(name: str) -> str | None:
    if len(name) > MAX_ENV_NAME:
        return f"environment variable name {shown(name, 20)} is longer than {MAX_ENV_NAME} characters"
    if not ENV_NAME.fullmatch(name):
        return f"{shown(name)} is not a valid environment variable name"
    return None


def env_problem(name: str, value: str) -> str | None:
    """One environment variable, `name=value`."""
    if (problem := env_name_problem(name)) is not None:
        return problem
    if (problem := encoding_problem(value)) is not None:
        return problem
    if _too_long(f"{name}={value}", MAX_ARG_BYTES):
        return f"{name}=VALUE is longer than {MAX_ARG_BYTES} bytes, the most one environment entry may hold"
    return None


def path_problem(path: str) -> str | None:
    if (problem := encoding_problem(path)) is not None:
        return problem
    if _too_long(path, MAX_PATH_BYTES):
        return f"is longer than {MAX_PATH_BYTES} bytes (PATH_MAX)"
    if any(_too_long(part, MAX_NAME_BYTES) for part in path.split("/")):
        return f"has a component longer than {MAX_NAME_BYTES} bytes (NAME_MAX)"
    return None


def image_problem(ref: str) -> str | None:
    if len(ref) > MAX_IMAGE_REF:
        return f"is not a valid image reference (longer than {MAX_IMAGE_REF} characters)"
    match = IMAGE.fullmatch(ref)
    if match is None:
        return f"{shown(ref)} is not a valid image reference"
    if len(match.group("name")) > MAX_IMAGE_NAME:
        return f"is not a valid image reference (its name is longer than {MAX_IMAGE_NAME} characters)"
    return None


def health_path_problem(path: str) -> str | None:
    if not path.startswith("/"):
        return f"must start with '/', got {shown(path)}"
    if len(path) > MAX_HEALTH_PATH:
        return f"is longer than {MAX_HEALTH_PATH} characters"
    if not _REQUEST_TARGET.fullmatch(path):
        return f"{shown(path)} is not a valid URL path (visible ASCII only: percent-encode spaces and the rest)"
    return None


def secret_value_problem(value: str) -> str | None:
    """A secret becomes an environment variable of the replicas that use it."""
    problem = encoding_problem(value)
    return None if problem is None else f"the value {problem} (a secret becomes an environment variable)"


def replica_id_problem(replica_id: str) -> str | None:
    if len(replica_id) > MAX_REPLICA_ID or not _REPLICA_ID.fullmatch(replica_id):
        return f"replica id {shown(replica_id)} is not a valid file name"
    return None


def launch_problem(assignment: Assignment) -> str | None:
    """Why a node cannot launch `assignment` as given, or None: every string of it that reaches a
    process, a path or a command line. Says which field, never echoes a value that cannot be
    encoded (the reason travels on to the server and its database)."""
    spec = assignment.spec
    checks: list[tuple[str, str | None]] = [
        ("replica_id", replica_id_problem(assignment.replica_id)),
        ("cluster", encoding_problem(assignment.cluster)),
    ]
    checks += [(f"gpus[{i}]", encoding_problem(gpu)) for i, gpu in enumerate(assignment.gpus)]
    checks += [(f"spec.command[{i}]", argument_problem(arg)) for i, arg in enumerate(spec.command)]
    checks += [(f"spec.env.{_key(k)}", env_problem(k, v)) for k, v in spec.env.items()]
    checks += [(f"spec.env_from_secret.{_key(k)}", env_problem(k, v)) for k, v in assignment.secret_env.items()]
    if spec.workdir is not None:
        checks.append(("spec.workdir", path_problem(spec.workdir)))
    if spec.image is not None:
        checks.append(("spec.image", encoding_problem(spec.image) or image_problem(spec.image)))
    if spec.health is not None:
        checks.append(("spec.health.path", encoding_problem(spec.health.path) or health_path_problem(spec.health.path)))
    for where, problem in checks:
        if problem is not None:
            return f"{where}: {problem}"
    return None


def _key(name: str) -> str:
    return name if env_name_problem(name) is None else "<invalid name>"


def shown(text: str, limit: int = 60) -> str:
    """`text` quoted for an error message: repr escapes a NUL or a surrogate (`\\x00`, `\\ud800`),
    and it is cut short, so a hostile megabyte never becomes a megabyte of error."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
