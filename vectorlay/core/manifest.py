"""Parse and validate cluster manifests (Kubernetes-style YAML, several documents per file).

Validation is strict: unknown or duplicate keys, wrong types, out-of-range numbers and bad names
or durations raise `ManifestError` with the YAML path and line. YAML is composed into nodes and
walked here rather than loaded, which keeps line numbers and rejects aliases outright, so an
"billion laughs" document can't expand. Every string that reaches a process, a path or a command
line on a node must be one the OS can take (`core.launch_inputs`): no NUL byte anywhere, nothing
that cannot be encoded, nothing longer than Linux accepts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
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
from vectorlay.errors import ManifestError

API_VERSION = "vectorlay.dev/v1"
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_DEPTH = 20
MAX_NODES = 20_000
MAX_PATH_KEY = 64  # characters of a key shown in an error's YAML path
RESERVED_ENV_PREFIX = "VECTORLAY_"
RESERVED_ENV = frozenset({"PORT"})

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
E = TypeVar("E", bound=Enum)


def is_dns_label(name: str) -> bool:
    return bool(_DNS_LABEL.fullmatch(name))


def parse_manifest(text: str, default_project: str = DEFAULT_PROJECT) -> list[ClusterSpec]:
    """Every cluster in `text`, validated; raise ManifestError on the first problem.

    A cluster whose metadata names no project goes into `default_project` (the server passes
    the project of the token applying it)."""
    if len(text.encode("utf-8", "replace")) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is larger than {MAX_MANIFEST_BYTES // 1024} KiB")
    documents = _compose(text)
    specs: list[ClusterSpec] = []
    seen: dict[str, int] = {}
    for node in documents:
        value = _Value(node, "")
        spec = _parse_cluster(value, default_project)
        if spec.key in seen:
            raise ManifestError(f"cluster {spec.name!r} is defined twice in this file", "metadata.name", value.line)
        seen[spec.key] = len(specs)
        specs.append(spec)
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

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def fail(self, message: str) -> ManifestError:
        return ManifestError(message, self.path, self.line)

    def child(self, key: str | int, node: yaml.Node) -> _Value:
        if isinstance(key, str) and len(key) > MAX_PATH_KEY:
            key = key[:MAX_PATH_KEY] + "..."  # a hostile key must not make a megabyte of error
        path = f"{self.path}[{key}]" if isinstance(key, int) else (f"{self.path}.{key}" if self.path else key)
        return _Value(node, path)

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
                raise ManifestError(f"duplicate key {shown(key)}", child.path, _Value(key_node, "").line)
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                raise ManifestError(f"unknown key {shown(key)} (allowed: {hint})", child.path,
                                    _Value(key_node, "").line)
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
        if minimum is not None and value < minimum:
            raise self.fail(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(f"must be at most {maximum}, got {value}")
        return value

    def number(self, minimum: float = 0.0) -> float:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"expected a number, got {_describe_value(value)}")
        if value < minimum or value != value:
            raise self.fail(f"must be at least {minimum:g}, got {value}")
        return float(value)

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
    spec = value.mapping(_SPEC_KEYS)
    replicas = spec["replicas"].integer(minimum=0, maximum=10_000) if "replicas" in spec else 1
    runtime = spec["runtime"].choice(Runtime) if "runtime" in spec else Runtime.CONTAINER
    image = spec["image"].string() if "image" in spec else None
    command = tuple(_argument(item) for item in spec["command"].sequence()) if "command" in spec else ()
    if runtime is Runtime.PROCESS and not command:
        raise (spec["command"] if "command" in spec else value).fail("the process runtime needs a non-empty 'command'")
    if runtime is Runtime.CONTAINER and image is None:
        raise value.fail("the container runtime (the default) needs an 'image'; or set 'runtime: process'")
    if image is not None and (problem := image_problem(image)) is not None:
        raise spec["image"].fail(problem)
    env = _parse_env(spec["env"]) if "env" in spec else {}
    return ClusterSpec(
        name=name,
        replicas=replicas,
        gpu=_parse_gpu(spec["gpu"]) if "gpu" in spec else GpuRequest(),
        runtime=runtime,
        image=image,
        command=command,
        env=env,
        port=spec["port"].integer(minimum=1, maximum=65535) if "port" in spec else 8000,
        health=_parse_health(spec["health"]) if "health" in spec else HealthCheck(),
        workdir=_path(spec["workdir"]) if "workdir" in spec else None,
        reschedule_after_s=spec["reschedule_after"].duration() if "reschedule_after" in spec else 30.0,
        isolation=spec["isolation"].choice(Isolation) if "isolation" in spec else Isolation.CONTAINER,
        image_pull=spec["image_pull"].choice(PullPolicy) if "image_pull" in spec else PullPolicy.IF_NOT_PRESENT,
        resources=_parse_resources(spec["resources"]) if "resources" in spec else Resources(),
        endpoint=_parse_endpoint(spec["endpoint"]) if "endpoint" in spec else EndpointConfig(),
        env_from_secret=_parse_secret_env(spec["env_from_secret"], env) if "env_from_secret" in spec else {},
        update=_parse_update(spec["update"]) if "update" in spec else UpdateStrategy(),
    )


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


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T)?")
_BYTES = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _memory_mb(value: _Value) -> int:
    """A Kubernetes-style quantity (`512Mi`, `4Gi`, `2G`, or bytes) in whole MiB, rounded up."""
    raw = value.scalar()
    text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
    match = _QUANTITY.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise value.fail(f"expected a memory size like 512Mi or 4Gi, got {_describe_value(raw)}")
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
