"""The node's options: saved at join, overridden by flags given later, checked on the way in; and
the address container ports are published on."""

from __future__ import annotations

import logging

import pytest

from vectorlay.cli.node import _options
from vectorlay.core.model import Gpu
from vectorlay.errors import UserError
from vectorlay.node.preflight import Preflight
from vectorlay.node.setup import NodeOptions, prepare_node, publish_ip


def test_options_survive_a_restart_and_flags_given_later_win() -> None:
    joined = NodeOptions(allow_process_runtime=True, container_cli="docker", oci_runtimes=("runc", "runsc"),
                         gpu_declarations=("RTX 4090:24",), data_plane="direct")
    saved = joined.settings()
    assert NodeOptions.from_settings(saved) == joined
    assert _options(saved, None, None, None, None) == joined
    changed = _options(saved, False, "podman", ["crun"], None)
    assert changed == NodeOptions(False, "podman", ("crun",), ("RTX 4090:24",), "direct")
    # A node joined before these options existed saved only its GPUs: it no longer runs process
    # replicas, and it was dialled directly (tunnels did not exist).
    assert _options({"gpu": []}, None, None, None, None) == NodeOptions(data_plane="direct")
    assert NodeOptions().data_plane == "tunnel"  # what `node join` does unless told otherwise


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown --oci-runtime 'youki'"):
        NodeOptions(oci_runtimes=("youki",))
    with pytest.raises(UserError, match="unknown --container-cli 'lxc'"):
        NodeOptions(container_cli="lxc")
    assert NodeOptions(container_cli="/usr/local/bin/docker").container_cli == "/usr/local/bin/docker"
    with pytest.raises(UserError, match="unknown --data-plane 'carrier-pigeon'"):
        NodeOptions(data_plane="carrier-pigeon")


def test_ports_are_published_on_the_advertised_address_when_it_is_this_machines() -> None:
    assert publish_ip("127.0.0.1") == "127.0.0.1"
    assert publish_ip("localhost") in ("127.0.0.1", "::1")
    # An address this machine does not have (a router forwarding to it): all addresses.
    assert publish_ip("203.0.113.7") == "0.0.0.0"


async def test_startup_says_in_one_line_what_the_node_offers_and_leaves_the_rest_to_node_check(
        caplog: pytest.LogCaptureFixture) -> None:
    """This machine (no NVIDIA driver, no Kata, no IOMMU) is a CPU development box: no warnings."""
    caplog.set_level(logging.INFO, logger="vectorlay")
    await prepare_node(NodeOptions(allow_process_runtime=True), "127.0.0.1")
    said = [r for r in caplog.records if r.name.startswith("vectorlay") and r.levelno >= logging.INFO]
    offers = [r.getMessage() for r in said if "this node offers" in r.getMessage()]
    assert len(offers) == 1 and "process replicas (not isolated)" in offers[0]
    assert "`vectorlay node check` shows what else it could offer" in offers[0]
    assert not [r for r in said if "missing" in r.getMessage() or "kata" in r.getMessage().lower()]


def test_the_offer_line_names_isolation_levels_with_their_runtimes_and_the_gpus() -> None:
    gpus = (Gpu("GPU-a", "NVIDIA GeForce RTX 4090", 24.0, 0), Gpu("GPU-b", "NVIDIA GeForce RTX 4090", 24.0, 1))
    preflight = Preflight(checks=(), container_ok=True, oci_runtimes=("runc", "runsc"),
                          isolation=("container", "sandbox"), runtimes=("container",), gpus=gpus)
    assert preflight.offer_line() == ("this node offers container (runc), sandbox (runsc); 2 GPU(s): NVIDIA GeForce "
                                      "RTX 4090; `vectorlay node check` shows what else it could offer")
    bare = Preflight(checks=(), container_ok=False, oci_runtimes=(), isolation=(), runtimes=(), gpus=())
    assert bare.offer_line().startswith("this node offers nothing it can run; no GPUs (no NVIDIA driver; declare")
