#!/usr/bin/env python3
"""The cost of operability: metrics and request logging on claims and executions (A/B), and the
time of a /metrics scrape with many runners.

Starts three release `poseidon` servers on the local backend (127.0.0.1, port 0, own state
directories and cgroup parents; as root):
  A  metrics.enabled: true,  logger.level: info   (one line per request, every figure recorded)
  B  metrics.enabled: false, logger.level: error  (neither)
  C  metrics.enabled: true,  logger.level: error  (metrics alone: A/C is the logging's share)
and runs `poseidon-loadgen --scenarios claim,execute` against A, B and C in turn, ROUNDS times,
so that all see the same machine load. With --runners 0 the scrape timing is skipped. Then it fills one environment of A with RUNNERS idle
runners, claims half of them, and times SCRAPES requests of `/metrics` against as many of
`/api/v1/version` (the same client, the same connection) for a ratio.

Usage: scripts/bench-ops.py [--rounds 2] [--runners 1000] [--scrapes 300] [--target DIR]
Binaries: DIR/release/poseidon and DIR/release/poseidon-loadgen (default target; build them with
`cargo build --release -p poseidon -p poseidon-loadgen`). Results: target/bench/ops.json and a
Markdown table on stdout. Stops everything it started.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

TOKEN = "bench-ops-" + os.urandom(6).hex()


class Server:
    def __init__(self, binary, work, name, uid_base, metrics, level):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        self.cgroup = f"poseidon-bench-ops-{os.getpid()}-{name}"
        config = os.path.join(self.dir, "configuration.yaml")
        with open(config, "w") as f:
            f.write(
                f"server: {{address: 127.0.0.1, port: 0, token: {TOKEN}}}\n"
                f"logger: {{level: {level}}}\n"
                f"metrics: {{enabled: {str(metrics).lower()}}}\n"
                f"local: {{statedir: {self.dir}/state, cgroupparent: {self.cgroup},"
                f" uidbase: {uid_base}, uidcount: 5000}}\n"
            )
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "--config", config], stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(f"{name} did not start: {line!r}")
        self.url = line.split()[-1]
        self.host, self.port = self.url.split("//")[1].rsplit(":", 1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for controller in ("memory", "pids", "cpu"):
            parent = f"/sys/fs/cgroup/{controller}/{self.cgroup}"
            if os.path.isdir(parent):
                for root, dirs, _ in os.walk(parent, topdown=False):
                    for d in dirs:
                        try:
                            os.rmdir(os.path.join(root, d))
                        except OSError:
                            pass
                try:
                    os.rmdir(parent)
                except OSError:
                    pass

    def request(self, conn, method, path, body=None):
        headers = {"Poseidon-Token": TOKEN}
        if body is not None:
            body = json.dumps(body)
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()


def loadgen(binary, server, env_base, out):
    subprocess.run(
        [
            binary, "--url", server.url, "--token", TOKEN, "--scenarios", "claim,execute",
            "--concurrency", "1,8", "--claim-count", "300", "--execute-count", "60",
            "--env-base", str(env_base), "--json", out,
        ],
        check=True, stdout=subprocess.DEVNULL,
    )
    with open(out) as f:
        return json.load(f)["rows"]


def scrape_timing(server, runners, scrapes):
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=600)
    env = {"image": "host", "prewarmingPoolSize": runners, "cpuLimit": 100, "memoryLimit": 0,
           "networkAccess": False, "exposedPorts": []}
    status, body = server.request(conn, "PUT", "/api/v1/execution-environments/9990", env)
    assert status in (201, 204), body
    deadline = time.time() + 900
    while True:
        _, body = server.request(conn, "GET", "/api/v1/statistics/execution-environments")
        idle = json.loads(body).get("9990", {}).get("idleRunners", 0)
        if idle >= runners:
            break
        if time.time() > deadline:
            raise SystemExit(f"the pool did not fill: {idle}/{runners}")
        time.sleep(0.5)
    claimed = 0
    for _ in range(runners // 2):
        status, _ = server.request(conn, "POST", "/api/v1/runners",
                                   {"executionEnvironmentId": 9990})
        claimed += status == 200
    # Let the pool refill so that the scrape sees idle + used + starting settle.
    time.sleep(1)

    def timed(path):
        samples = []
        for _ in range(scrapes):
            started = time.perf_counter()
            status, body = server.request(conn, "GET", path)
            samples.append((time.perf_counter() - started) * 1000)
            assert status == 200, body
        return samples, len(body)

    timed("/metrics")  # warm-up
    metrics, size = timed("/metrics")
    version, _ = timed("/api/v1/version")
    _, body = server.request(conn, "GET", "/api/v1/statistics/execution-environments")
    stats = json.loads(body)["9990"]
    return {
        "runners_idle": stats["idleRunners"], "runners_used": stats["usedRunners"],
        "claimed": claimed, "scrapes": scrapes, "metrics_bytes": size,
        "metrics_p50_ms": statistics.median(metrics),
        "metrics_p99_ms": sorted(metrics)[int(len(metrics) * 0.99) - 1],
        "version_p50_ms": statistics.median(version),
        "ratio_p50": statistics.median(metrics) / statistics.median(version),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runners", type=int, default=1000)
    p.add_argument("--scrapes", type=int, default=300)
    p.add_argument("--target", default="target")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench-ops.py: run as root (the local backend creates cgroups)")
    server_bin = os.path.join(args.target, "release", "poseidon")
    loadgen_bin = os.path.join(args.target, "release", "poseidon-loadgen")
    work = tempfile.mkdtemp(prefix="poseidon-bench-ops.")
    os.chmod(work, 0o755)
    servers = []
    try:
        a = Server(server_bin, work, "a", 4_400_000, True, "info")
        servers.append(a)
        b = Server(server_bin, work, "b", 4_500_000, False, "error")
        servers.append(b)
        c = Server(server_bin, work, "c", 4_600_000, True, "error")
        servers.append(c)
        rows = {"A": [], "B": [], "C": []}
        for round_ in range(args.rounds):
            for name, server, base in (("A", a, 9200), ("B", b, 9300), ("C", c, 9400)):
                rows[name] += loadgen(loadgen_bin, server, base + 20 * round_,
                                      os.path.join(work, f"{name}{round_}.json"))
        ab = []
        for scenario, variant, concurrency in sorted(
            {(r["scenario"], r["variant"], r["concurrency"]) for r in rows["A"]}
        ):
            def pick(name, key):
                values = [r[key] if key == "rate" else r["latency"][key] for r in rows[name]
                          if (r["scenario"], r["variant"], r["concurrency"])
                          == (scenario, variant, concurrency)]
                return statistics.median(values)
            ab.append({
                "scenario": scenario, "variant": variant, "concurrency": concurrency,
                "rate_a": pick("A", "rate"), "rate_b": pick("B", "rate"), "rate_c": pick("C", "rate"),
                "p50_a_ms": pick("A", "p50_ms"), "p50_b_ms": pick("B", "p50_ms"),
                "p50_c_ms": pick("C", "p50_ms"),
                "unit": next(r["rate_unit"] for r in rows["A"] if r["scenario"] == scenario),
            })
        scrape = scrape_timing(a, args.runners, args.scrapes) if args.runners else None
        result = {"ab": ab, "scrape": scrape, "rounds": args.rounds}
        os.makedirs(os.path.join(args.target, "bench"), exist_ok=True)
        with open(os.path.join(args.target, "bench", "ops.json"), "w") as f:
            json.dump(result, f, indent=2)
        print("| scenario | variant | conc. | unit | rate A (both on) | rate C (metrics only) | rate B (off) |"
              " A/B rate | C/B rate | p50 A ms | p50 C ms | p50 B ms | A/B p50 | C/B p50 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in ab:
            print(f"| {r['scenario']} | {r['variant']} | {r['concurrency']} | {r['unit']} | {r['rate_a']:.1f} |"
                  f" {r['rate_c']:.1f} | {r['rate_b']:.1f} | {r['rate_a'] / r['rate_b']:.3f} |"
                  f" {r['rate_c'] / r['rate_b']:.3f} | {r['p50_a_ms']:.2f} | {r['p50_c_ms']:.2f} |"
                  f" {r['p50_b_ms']:.2f} | {r['p50_a_ms'] / r['p50_b_ms']:.3f} |"
                  f" {r['p50_c_ms'] / r['p50_b_ms']:.3f} |")
        if scrape:
            print()
            print(f"/metrics with {scrape['runners_idle']} idle + {scrape['runners_used']} used runners:"
                  f" p50 {scrape['metrics_p50_ms']:.3f} ms, p99 {scrape['metrics_p99_ms']:.3f} ms"
                  f" ({scrape['metrics_bytes']} bytes); GET /version p50 {scrape['version_p50_ms']:.3f} ms;"
                  f" ratio {scrape['ratio_p50']:.2f}")
    finally:
        for s in reversed(servers):
            s.stop()
        for s in servers:
            for d in os.listdir(os.path.join(s.dir, "state", "runners")) if os.path.isdir(
                    os.path.join(s.dir, "state", "runners")) else []:
                subprocess.run(["umount", "-l", os.path.join(s.dir, "state", "runners", d)],
                               stderr=subprocess.DEVNULL)
        shutil.copytree(work, os.path.join(args.target, "bench", "ops-logs"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("state"))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
