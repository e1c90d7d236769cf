"""Parse and validate cluster manifests (Kubernetes-style YAML, several documents per file).

Validation is strict: unknown or duplicate keys, wrong types, out-of-range numbers and bad names
or durations raise `ManifestError` with the YAML path and line; every problem of a file is
reported at once (`ManifestErrors`), not only the first. Numbers are plain decimals only: YAML 1.1
reads `0x10`, `010`, `1_000` and `1:30` as 16, 8, 1000 and 90, which nobody means in a manifest.
YAML is composed into nodes and walked here rather than loaded, which keeps line numbers and
rejects aliases outright, so an "billion laughs" document can't expand. Every string that reaches
a process, a path or a command line on a node must be one the OS can take (`core.launch_inputs`):
no NUL byte anywhere, nothing that cannot be encoded, nothing longer than Linux accepts.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, TypeVar

import yaml

from vectorlay.core.durations import parse_duration
from vectorlay.core.launch_inputs import (
    argument_problem,
    encoding_problem,
    env_name_problem,
    env_problem,
    health_path_problem,
    image_problem,
    path_problem,
    shown,
)
from vectorlay.core.model import (
    DEFAULT_PROJECT,
    ClusterSpec,
    EndpointConfig,
    GpuRequest,
    HealthCheck,
    Isolation,
    PullPolicy,
    RateLimit,
    Resources,
    Runtime,
    UpdateStrategy,
)
from vectorlay.errors import ManifestError, ManifestErrors

API_VERSION = "vectorlay.dev/v1"
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_DEPTH = 20
MAX_NODES = 20_000
MAX_PATH_KEY = 64  # characters of a key shown in an error's YAML path
RESERVED_ENV_PREFIX = "VECTORLAY_"
RESERVED_ENV = frozenset({"PORT"})

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# name[:tag][@digest], each name component lowercase; loose on purpose (registries vary), strict
# enough to refuse spaces, uppercase names and shell metacharacters.
_IMAGE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-]{1,2}[a-z0-9]+)*)*"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?")
# What a replica's command may refer to as ${NAME} besides its own env and env_from_secret names
# (set by the agent, see node/supervisor.py replica_env); CUDA_VISIBLE_DEVICES only with GPUs.
REPLICA_VARIABLES = ("PORT", "VECTORLAY_HOST", "VECTORLAY_CLUSTER", "VECTORLAY_REPLICA", "VECTORLAY_NODE",
                     "VECTORLAY_NODE_ID")
_PLAIN_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_PLAIN_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?|-?\.[0-9]+")
E = TypeVar("E", bound=Enum)
T = TypeVar("T")


def is_dns_label(name: str) -> bool:
    return bool(_DNS_LABEL.fullmatch(name))


def parse_manifest(text: str, default_project: str = DEFAULT_PROJECT, source: str | None = None) -> list[ClusterSpec]:
    """Every cluster in `text`, validated; raise ManifestErrors (a ManifestError) with every
    problem found, named after `source` (the file) when given.

    A cluster whose metadata names no project goes into `default_project` (the server passes
    the project of the token applying it)."""
    try:
        return _parse_documents(text, default_project)
    except ManifestErrors as errors:
        raise ManifestErrors(errors.problems, source) from None
    except ManifestError as error:
        raise ManifestErrors([error], source) from None


def _parse_documents(text: str, default_project: str) -> list[ClusterSpec]:
    if len(text.encode("utf-8", "replace")) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is larger than {MAX_MANIFEST_BYTES // 1024} KiB")
    documents = _compose(text)
    specs: list[ClusterSpec] = []
    seen: dict[str, int] = {}
    problems: list[ManifestError] = []
    for node in documents:
        value = _Value(node, "", problems)
        found = len(problems)
        try:
            spec = _parse_cluster(value, default_project)
        except ManifestError as error:
            problems.append(error)
            continue
        if len(problems) > found:
            continue  # a field of it was wrong: already reported
        if spec.key in seen:
            problems.append(ManifestError(f"cluster {spec.name!r} is defined twice in this file", "metadata.name",
                                          value.line))
        seen[spec.key] = len(specs)
        specs.append(spec)
    if problems:
        raise ManifestErrors(sorted(problems, key=lambda problem: problem.line or 0))
    if not specs:
        raise ManifestError("the manifest holds no cluster")
    return specs


def _compose(text: str) -> list[yaml.Node]:
    try:
        _check_events(text)
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as error:
        line = error.problem_mark.line + 1 if error.problem_mark else None
        raise ManifestError(f"invalid YAML: {error.problem or error}", "", line) from None
    except yaml.YAMLError as error:
        raise ManifestError(f"invalid YAML: {error}") from None
    # An empty document (a trailing `---`) composes to an empty null scalar: skip it.
    return [node for node in documents if not _is_empty(node)]


def _is_empty(node: yaml.Node | None) -> bool:
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"
                            and node.value in ("", "~", "null", "Null", "NULL"))


def _check_events(text: str) -> None:
    """Walk the event stream (flat, so a hostile document cannot exhaust the stack) and refuse
    anchors, aliases, too many values and too deep nesting before anything is built."""
    depth = 0
    values = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ManifestError("YAML anchors and aliases are not allowed", "", line)
        if isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
            values += 1
            if values > MAX_NODES:
                raise ManifestError(f"manifest has more than {MAX_NODES} values", "", line)
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ManifestError(f"manifest is nested deeper than {MAX_DEPTH} levels", "", line)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


_SCALARS = yaml.SafeLoader("")
_SCALAR_TAGS: dict[str, Callable[[yaml.ScalarNode], Any]] = {
    "tag:yaml.org,2002:str": _SCALARS.construct_yaml_str,
    "tag:yaml.org,2002:int": _SCALARS.construct_yaml_int,
    "tag:yaml.org,2002:float": _SCALARS.construct_yaml_float,
    "tag:yaml.org,2002:bool": _SCALARS.construct_yaml_bool,
    "tag:yaml.org,2002:null": _SCALARS.construct_yaml_null,
}


@dataclass(frozen=True)
class _Value:
    """A YAML node plus its path, with typed accessors that raise ManifestError."""

    node: yaml.Node
    path: str
    # Where problems go instead of being raised, for the fields that can be checked on their own
    # (`tolerant`, `mapping`): so a file's problems are all found in one pass. None: raise.
    problems: list[ManifestError] | None = field(default=None, compare=False)

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def fail(self, message: str) -> ManifestError:
        return ManifestError(message, self.path, self.line)

    def child(self, key: str | int, node: yaml.Node) -> _Value:
        if isinstance(key, str) and len(key) > MAX_PATH_KEY:
            key = key[:MAX_PATH_KEY] + "..."  # a hostile key must not make a megabyte of error
        path = f"{self.path}[{key}]" if isinstance(key, int) else (f"{self.path}.{key}" if self.path else key)
        return _Value(node, path, self.problems)

    def report(self, error: ManifestError) -> None:
        if self.problems is None:
            raise error
        self.problems.append(error)

    def tolerant(self, parse: Callable[[_Value], T], default: T) -> T:
        """`parse(self)`, or `default` once its problem is reported (see `problems`)."""
        try:
            return parse(self)
        except ManifestError as error:
            self.report(error)
            return default

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.fail(f"expected a single value, got {_describe(self.node)}")
        construct = _SCALAR_TAGS.get(self.node.tag)
        if construct is None:
            raise self.fail(f"unsupported YAML tag {self.node.tag}")
        try:
            value = construct(self.node)
        except (ValueError, IndexError, KeyError, TypeError) as error:
            # An explicit tag on a value that does not fit it (`!!int abc`), or an integer too
            # long for Python to convert.
            raise self.fail(f"invalid {self.node.tag.rsplit(':', 1)[-1]} {self.node.value[:40]!r} ({error})") from None
        # YAML's "\0" and "\ud800" escapes make strings that no process, path, database or
        # UTF-8 encoder can take: refused wherever they appear, keys included.
        if isinstance(value, str) and (problem := encoding_problem(value)) is not None:
            raise self.fail(problem)
        return value

    def mapping(self, allowed: set[str]) -> dict[str, _Value]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.fail(f"expected a mapping, got {_describe(self.node)}")
        result: dict[str, _Value] = {}
        for key_node, value_node in self.node.value:
            key = _Value(key_node, self.path).scalar()
            if not isinstance(key, str):
                raise _Value(key_node, self.path).fail(f"keys must be strings, got {key!r}")
            child = self.child(key, value_node)
            if key in result:
                self.report(ManifestError(f"duplicate key {shown(key)}", child.path, _Value(key_node, "").line))
                continue
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
                guess = f"; did you mean {close[0]!r}?" if close else ""
                hint = ", ".join(sorted(allowed))
                self.report(ManifestError(f"unknown key {shown(key)}{guess} (allowed: {hint})", child.path,
                                          _Value(key_node, "").line))
                continue
            result[key] = child
        return result

    def sequence(self) -> list[_Value]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.fail(f"expected a list, got {_describe(self.node)}")
        return [self.child(i, item) for i, item in enumerate(self.node.value)]

    def string(self, allow_empty: bool = False) -> str:
        value = self.scalar()
        if not isinstance(value, str):
            raise self.fail(f"expected a string, got {_describe_value(value)}")
        if not allow_empty and not value:
            raise self.fail("must not be empty")
        return value

    def integer(self, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"expected an integer, got {_describe_value(value)}")
        self._plain(_PLAIN_INTEGER, value, "a plain decimal integer")
        if minimum is not None and value < minimum:
            raise self.fail(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(f"must be at most {maximum}, got {value}")
        return value

    def number(self, minimum: float = 0.0) -> float:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"expected a number, got {_describe_value(value)}")
        self._plain(_PLAIN_NUMBER, value, "a plain decimal number like 2 or 0.5")
        if value < minimum or value != value:
            raise self.fail(f"must be at least {minimum:g}, got {value}")
        return float(value)

    def _plain(self, form: re.Pattern[str], value: float, what: str) -> None:
        """YAML 1.1 also reads hex, octal, `_` separators and base 60 as numbers: refuse them."""
        assert isinstance(self.node, yaml.ScalarNode)
        written = self.node.value.strip()
        if not form.fullmatch(written.lstrip("+")):
            raise self.fail(f"write {what}: {written!r} is read as {value!r} by YAML 1.1, which is rarely "
                            "what was meant")

    def choice(self, kind: type[E]) -> E:
        raw = self.string()
        try:
            return kind(raw)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in kind)
            what = self.path.rsplit(".", 1)[-1].replace("_", " ")
            raise self.fail(f"unknown {what} {raw!r} (allowed: {allowed})") from None

    def duration(self, minimum_s: float = 0.0) -> float:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(f"expected a duration like 2s or 500ms, got {_describe_value(value)}")
        try:
            seconds = parse_duration(value)
        except ValueError as error:
            raise self.fail(str(error)) from None
        if seconds < minimum_s:
            raise self.fail(f"must be at least {minimum_s:g}s")
        return seconds


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{node.value!r}"


def _describe_value(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return f"{type(value).__name__} ({value!r})"


def _parse_cluster(doc: _Value, default_project: str) -> ClusterSpec:
    top = doc.mapping({"apiVersion", "kind", "metadata", "spec"})
    for key in ("apiVersion", "kind", "metadata", "spec"):
        if key not in top:
            raise doc.fail(f"missing required key {key!r}")
    if (version := top["apiVersion"].string()) != API_VERSION:
        raise top["apiVersion"].fail(f"unsupported apiVersion {version!r} (expected {API_VERSION!r})")
    if (kind := top["kind"].string()) != "Cluster":
        raise top["kind"].fail(f"unsupported kind {kind!r} (expected 'Cluster')")
    metadata = top["metadata"].mapping({"name", "project"})
    if "name" not in metadata:
        raise top["metadata"].fail("missing required key 'name'")
    name = metadata["name"].string()
    if not is_dns_label(name):
        raise metadata["name"].fail(
            f"{name!r} is not a valid name: use lowercase letters, digits and '-', at most 63 characters, "
            "starting and ending with a letter or digit"
        )
    project = default_project
    if "project" in metadata:
        project = metadata["project"].string()
        if not is_dns_label(project):
            raise metadata["project"].fail(f"{project!r} is not a valid project name (a DNS label)")
    return replace(_parse_spec(name, top["spec"]), project=project)


_SPEC_KEYS = {"replicas", "gpu", "runtime", "image", "command", "env", "port", "health", "workdir",
              "reschedule_after", "isolation", "image_pull", "resources", "endpoint", "env_from_secret", "update"}


def _parse_spec(name: str, value: _Value) -> ClusterSpec:
    found = len(value.problems) if value.problems is not None else 0
    spec = value.mapping(_SPEC_KEYS)

    def get(key: str, parse: Callable[[_Value], T], default: T) -> T:
        """Each field on its own: a wrong one is reported and the others are still checked."""
        return spec[key].tolerant(parse, default) if key in spec else default

    no_env: dict[str, str] = {}
    no_command: tuple[str, ...] = ()
    no_image: str | None = None
    default_health: HealthCheck | None = HealthCheck()
    no_gpu = GpuRequest()
    replicas = get("replicas", lambda v: v.integer(minimum=0, maximum=10_000), 1)
    runtime = get("runtime", lambda v: v.choice(Runtime), Runtime.CONTAINER)
    image = get("image", lambda v: v.string(), no_image)
    command = get("command", lambda v: tuple(_argument(item) for item in v.sequence()), no_command)
    env = get("env", _parse_env, no_env)
    secrets = get("env_from_secret", lambda v: _parse_secret_env(v, env), no_env)
    parsed = ClusterSpec(
        name=name,
        replicas=replicas,
        gpu=get("gpu", _parse_gpu, no_gpu),
        runtime=runtime,
        image=image,
        command=command,
        env=env,
        port=get("port", lambda v: v.integer(minimum=1, maximum=65535), 8000),
        health=get("health", _parse_health, default_health),
        workdir=get("workdir", _path, no_image),
        reschedule_after_s=get("reschedule_after", lambda v: v.duration(), 30.0),
        isolation=get("isolation", lambda v: v.choice(Isolation), Isolation.CONTAINER),
        image_pull=get("image_pull", lambda v: v.choice(PullPolicy), PullPolicy.IF_NOT_PRESENT),
        resources=get("resources", _parse_resources, Resources()),
        endpoint=get("endpoint", _parse_endpoint, EndpointConfig()),
        env_from_secret=secrets,
        update=get("update", _parse_update, UpdateStrategy()),
    )
    # The names a command may use come from env, env_from_secret and gpu: check it unless one of
    # those was wrong (a default stands in for it, which would make every name look unknown).
    fields_ok = all(key not in spec or parsed_value is not default for key, parsed_value, default in (
        ("env", env, no_env), ("env_from_secret", secrets, no_env), ("gpu", parsed.gpu, no_gpu)))
    if "command" in spec and command is not no_command and fields_ok:
        _check_command_variables(spec["command"], parsed)
    if value.problems is not None and len(value.problems) > found:
        return parsed  # checks across fields would only repeat what is already reported
    if runtime is Runtime.PROCESS and not command:
        raise (spec["command"] if "command" in spec else value).fail("the process runtime needs a non-empty 'command'")
    if runtime is Runtime.CONTAINER and image is None:
        raise value.fail("the container runtime (the default) needs an 'image'; or set 'runtime: process'")
    if image is not None and (problem := image_problem(image)) is not None:
        raise spec["image"].fail(problem)
    if image is not None and not _IMAGE.fullmatch(image):
        raise spec["image"].fail(f"{image!r} is not a valid image reference")
    return parsed


def _check_command_variables(value: _Value, spec: ClusterSpec) -> None:
    """Each ${NAME} in the command must be a variable the replica has: the agent expands it, and
    an unknown one would silently stay as written (or, through a shell, become empty). Secrets are
    not allowed there: a command line is visible to every user of the node (`ps`). `$${NAME}`
    leaves `${NAME}` for a shell in the replica to expand."""
    known = set(REPLICA_VARIABLES) | set(spec.env) | ({"CUDA_VISIBLE_DEVICES"} if spec.gpu.count else set())
    for item in value.sequence():
        text = item.string(allow_empty=True)
        for match in string.Template.pattern.finditer(text):
            name = match.group("braced")
            if name is None or name in known:
                continue
            if name in spec.env_from_secret:
                item.report(item.fail(f"${{{name}}} is a secret, and a command line is visible to every user of "
                                      f"the node (ps): let the workload read {name} from its environment"))
            else:
                item.report(item.fail(f"${{{name}}} is not a variable this replica has (it has "
                                      f"{', '.join(REPLICA_VARIABLES)}, CUDA_VISIBLE_DEVICES with a GPU, and what "
                                      f"'env' sets); write $${{{name}}} to leave it to a shell in the replica"))


def _parse_update(value: _Value) -> UpdateStrategy:
    update = value.mapping({"max_surge", "max_unavailable"})
    surge = update["max_surge"].integer(minimum=0, maximum=10_000) if "max_surge" in update else None
    unavailable = update["max_unavailable"].integer(minimum=0, maximum=10_000) if "max_unavailable" in update else None
    if surge == 0 and unavailable == 0:
        raise value.fail("max_surge and max_unavailable cannot both be 0: a rolling update could never start")
    return UpdateStrategy(surge, unavailable)


def _argument(value: _Value) -> str:
    argument = value.string(allow_empty=True)
    if (problem := argument_problem(argument)) is not None:
        raise value.fail(problem)
    return argument


def _path(value: _Value) -> str:
    path = value.string()
    if (problem := path_problem(path)) is not None:
        raise value.fail(problem)
    return path


def _parse_secret_env(value: _Value, env: dict[str, str]) -> dict[str, str]:
    """`{API_TOKEN: hf-token}`: the env var gets the value of the project's secret `hf-token`."""
    if not isinstance(value.node, yaml.MappingNode):
        raise value.fail(f"expected a mapping of environment names to secret names, got {_describe(value.node)}")
    keys = {str(k.value) for k, _ in value.node.value}
    result: dict[str, str] = {}
    for key, item in value.mapping(keys).items():
        _check_env_name(key, item)
        if key in env:
            raise item.fail(f"{key!r} is also set in 'env'")
        secret = item.string()
        if not is_dns_label(secret):
            raise item.fail(f"{secret!r} is not a valid secret name (a DNS label)")
        result[key] = secret
    return result


def _parse_resources(value: _Value) -> Resources:
    resources = value.mapping({"cpus", "memory"})
    cpus = resources["cpus"].number(minimum=0.01) if "cpus" in resources else None
    memory = _memory_mb(resources["memory"]) if "memory" in resources else None
    return Resources(cpus=cpus, memory_mb=memory)


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)\s*(?:(Ki|Mi|Gi|Ti|K|M|G|T)B?)?")  # `4Gi`, `4GiB`, `4G`, `4GB`
_BYTES = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _memory_mb(value: _Value) -> int:
    """A Kubernetes-style quantity (`512Mi`, `4Gi`, `2G`, or bytes; `MiB`, `GB` and the like too)
    in whole MiB, rounded up."""
    raw = value.scalar()
    text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
    match = _QUANTITY.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise value.fail(f"expected a memory size: 512Mi or 512MiB, 4Gi or 4GiB (binary), 4G or 4GB "
                         f"(decimal), or a number of bytes; got {_describe_value(raw)}")
    size = float(match.group(1)) * _BYTES[match.group(2)]
    mib = math.ceil(size / 2**20)
    if mib < 6:
        raise value.fail("must be at least 6Mi (container runtimes refuse less)")
    return mib


def _parse_endpoint(value: _Value) -> EndpointConfig:
    endpoint = value.mapping({"auth", "rate_limit"})
    auth = "none"
    if "auth" in endpoint:
        auth = endpoint["auth"].string()
        if auth not in ("none", "api-key"):
            raise endpoint["auth"].fail(f"unknown auth {auth!r} (allowed: none, api-key)")
    limit = per_client = None
    if "rate_limit" in endpoint:
        fields = endpoint["rate_limit"].mapping({"requests_per_second", "burst", "per_client"})
        if "requests_per_second" in fields:
            limit = _rate(endpoint["rate_limit"], fields)
        if "per_client" in fields:
            per_client = _rate(fields["per_client"], fields["per_client"].mapping({"requests_per_second", "burst"}))
        if limit is None and per_client is None:
            raise endpoint["rate_limit"].fail("give requests_per_second, per_client, or both")
    return EndpointConfig(auth, limit, per_client)


def _rate(value: _Value, fields: dict[str, _Value]) -> RateLimit:
    if "requests_per_second" not in fields:
        raise value.fail("missing required key 'requests_per_second'")
    rate = fields["requests_per_second"].number(minimum=0.001)
    burst = fields["burst"].integer(minimum=1, maximum=1_000_000) if "burst" in fields else max(1, math.ceil(rate))
    return RateLimit(rate, burst)


def _parse_gpu(value: _Value) -> GpuRequest:
    gpu = value.mapping({"type", "count", "min_memory_gb"})
    types: tuple[str, ...] = ()
    if "type" in gpu:
        node = gpu["type"]
        if isinstance(node.node, yaml.SequenceNode):
            types = tuple(item.string() for item in node.sequence())
            if not types:
                raise node.fail("list of GPU types must not be empty")
        else:
            types = (node.string(),)
        if any(t.strip().lower() in {"any", "*"} for t in types):
            types = ()
    count = gpu["count"].integer(minimum=0, maximum=64) if "count" in gpu else 1
    memory = gpu["min_memory_gb"].number() if "min_memory_gb" in gpu else None
    return GpuRequest(types=types, count=count, min_memory_gb=memory)


def _parse_env(value: _Value) -> dict[str, str]:
    if not isinstance(value.node, yaml.MappingNode):
        raise value.fail(f"expected a mapping of names to values, got {_describe(value.node)}")
    keys = {str(k.value) for k, _ in value.node.value}
    env: dict[str, str] = {}
    for key, item in value.mapping(keys).items():
        _check_env_name(key, item)
        raw = item.scalar()
        if isinstance(raw, bool) or raw is None or not isinstance(raw, str | int | float):
            raise item.fail(f"expected a string or number, got {_describe_value(raw)} (quote it)")
        if (problem := env_problem(key, str(raw))) is not None:
            raise item.fail(problem)
        env[key] = str(raw)
    return env


def _check_env_name(key: str, item: _Value) -> None:
    if (problem := env_name_problem(key)) is not None:
        raise item.fail(problem)
    if key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIX):
        raise item.fail(f"{key!r} is set by vectorlay and cannot be overridden")


def _parse_health(value: _Value) -> HealthCheck | None:
    if isinstance(value.node, yaml.ScalarNode) and value.scalar() is None:
        return None  # `health: null` disables probing: running means ready
    health = value.mapping({"path", "interval", "timeout", "failure_threshold", "startup_timeout",
                            "unready_timeout"})
    path = health["path"].string() if "path" in health else "/healthz"
    if (problem := health_path_problem(path)) is not None:
        raise health["path"].fail(problem)
    interval = health["interval"].duration(minimum_s=0.1) if "interval" in health else 2.0
    timeout = health["timeout"].duration(minimum_s=0.05) if "timeout" in health else 1.0
    if timeout > interval:
        raise health["timeout"].fail("must not be longer than the interval")
    threshold = health["failure_threshold"].integer(minimum=1, maximum=100) if "failure_threshold" in health else 3
    startup = health["startup_timeout"].duration(minimum_s=1) if "startup_timeout" in health else 600.0
    unready = health["unready_timeout"].duration(minimum_s=1) if "unready_timeout" in health else 60.0
    return HealthCheck(path=path, interval_s=interval, timeout_s=timeout, failure_threshold=threshold,
                       startup_timeout_s=startup, unready_timeout_s=unready)
