"""A/B of two checkouts' proxies: requests/s, CPU per request and latency, in alternating rounds.

Changes worth a few per cent drown in this shared machine's swings between runs; alternating
short rounds of the two proxies in one run, and taking medians, cancels most of that. Both
`vectorlay proxy` processes (each from its own checkout) sit in front of one nginx `return 200`
upstream with routes from the scripted control plane, as in bench/proxy.py.

- `--load saturated`: wrk -c50 as fast as it goes (figure 1's load). With `--pin`, both proxies
  run on CPU 0 and wrk and the upstream on CPU 1, so the proxies do not compete with their load.
- `--load paced`: wrk -c20 with a 10 ms pause per request on each connection (~1,800 req/s here),
  so nearly every request finds the proxy waiting: the timed waits' cost shows.

Also useful as an A/A check (the same checkout twice) to see what difference is noise.

    python bench/proxy_ab.py BASE_CHECKOUT NEW_CHECKOUT [--load paced] [--rounds 8] [--seconds 4] [--pin]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import proxy as bench  # noqa: E402  (bench/proxy.py)
import proxy_cpu  # noqa: E402

PACED_CONNECTIONS = 20


def one_round(port: int, pid: int, paced: bool, seconds: float, pin: bool) -> tuple[float, float, float, float]:
    """(requests/s, proxy CPU µs per request, p50 ms, p99 ms) of one wrk run."""
    connections = PACED_CONNECTIONS if paced else 50
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-H", f"Host: {bench.HOST}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(f"function delay() return {bench.PACE_MS} end\n" if paced else "")
        script.flush()
        command += ["-s", script.name, f"http://127.0.0.1:{port}/"]
        if pin:
            command = ["taskset", "-c", "1", *command]
        before = proxy_cpu.cpu_seconds(pid)[0]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        after = proxy_cpu.cpu_seconds(pid)[0]
    result = bench.parse_wrk(out)
    return result.rps, (after - before) / result.requests * 1e6, result.p50_ms, result.p99_ms


def pin_to(cpu: int, pid: int) -> None:
    subprocess.run(["taskset", "-pc", str(cpu), str(pid)], capture_output=True, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--load", choices=("saturated", "paced"), default="saturated")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--pin", action="store_true", help="proxies on CPU 0, wrk and the upstream on CPU 1")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vl-proxy-ab-"))
    upstream_port = bench.free_port()
    upstream = bench.nginx_static(root, upstream_port)
    names = ("base", "new")
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in names}
    try:
        bench.wait_listening(upstream_port)
        variants = [bench.Variant(name, None, tree.resolve()) for name, tree in zip(names, (args.base, args.new),
                                                                                   strict=True)]
        with bench.proxies(root, [upstream_port], variants) as running:
            running.pop("nginx")
            if args.pin:
                for _, pid in running.values():
                    pin_to(0, pid)
                pin_to(1, upstream.popen.pid)
                pin_to(1, upstream.worker())
            for port, _ in running.values():
                bench.wrk(port, 10, 1)  # warm up
            for round_ in range(args.rounds):
                order = names if round_ % 2 == 0 else names[::-1]
                for name in order:
                    port, pid = running[name]
                    results[name].append(one_round(port, pid, args.load == "paced", args.seconds, args.pin))
                latest = {name: results[name][-1] for name in names}
                print(f"round {round_ + 1}: " + " ".join(
                    f"{name}_rps={rps:.0f} {name}_cpu_us={cpu:.1f}" for name, (rps, cpu, _, _) in latest.items()),
                    flush=True)
    finally:
        upstream.stop()
    medians = {name: [statistics.median(r[i] for r in results[name]) for i in range(4)] for name in names}
    for name in names:
        rps, cpu, p50, p99 = medians[name]
        print(f"{name} (median of {args.rounds}): rps={rps:.0f} cpu_us_per_request={cpu:.1f} p50_ms={p50:.3f} "
              f"p99_ms={p99:.3f}")
    paired = [n[1] / b[1] for b, n in zip(results["base"], results["new"], strict=True)]
    ratio = [n / b for b, n in zip(medians["base"], medians["new"], strict=True)]
    print(f"new/base: rps={ratio[0]:.3f} cpu_per_request={ratio[1]:.3f} (round by round: "
          f"{statistics.median(paired):.3f}) p50={ratio[2]:.3f} p99={ratio[3]:.3f}")


if __name__ == "__main__":
    main()
