#!/usr/bin/env python3
"""Executions on one claimed runner of a running local-backend server, with the CPU they cost.

    scripts/bench-exec.py --url http://127.0.0.1:PORT --token TOKEN --server-pid PID \
        --environment ID --count 200 --command /usr/bin/true [--command true ...]

For each command: `POST /runners/{id}/execute`, then the WebSocket read to its final message, COUNT
times on the same claimed runner (no pool refill competes), reporting wall time per execution (mean
and p50) and the CPU the runner's agent, the programs it started and the server spent per execution
(from /proc/PID/stat; the agent is found as the runner's `agent --listen` process). The environment
must exist. Standard library only (a minimal WebSocket reader), so it runs anywhere python3 does.
"""
import argparse, base64, http.client, json, os, socket, statistics, subprocess, time, urllib.parse


def websocket_run(url, token):
    u = urllib.parse.urlparse(url)
    sock = socket.create_connection((u.hostname, u.port))
    key = base64.b64encode(os.urandom(16)).decode()
    path = u.path + ("?" + u.query if u.query else "")
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Poseidon-Token: {token}\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(4096)
    head, buf = buf.split(b"\r\n\r\n", 1)
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))
    while True:
        while len(buf) < 2:
            buf += sock.recv(65536)
        length, offset = buf[1] & 127, 2
        if length == 126:
            while len(buf) < 4:
                buf += sock.recv(65536)
            length, offset = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            while len(buf) < 10:
                buf += sock.recv(65536)
            length, offset = int.from_bytes(buf[2:10], "big"), 10
        while len(buf) < offset + length:
            buf += sock.recv(65536)
        opcode, payload, buf = buf[0] & 15, buf[offset:offset + length], buf[offset + length:]
        if opcode == 1:
            message = json.loads(payload)
            if message["type"] in ("exit", "error", "timeout"):
                sock.close()
                return message


def cpu_ms(pid):
    """utime, stime, cutime, cstime of PID in milliseconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return [int(x) * 1000 / tick for x in fields[11:15]]


def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--token", default="")
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--environment", type=int, required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--command", action="append", required=True)
    a = p.parse_args()
    u = urllib.parse.urlparse(a.url)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    headers = {"Poseidon-Token": a.token, "Content-Type": "application/json"}

    def request(method, path, body=None):
        conn.request(method, "/api/v1" + path, body=None if body is None else json.dumps(body), headers=headers)
        r = conn.getresponse()
        return r.status, r.read()

    deadline = time.time() + 60
    while True:
        status, body = request("POST", "/runners", {"executionEnvironmentId": a.environment, "inactivityTimeout": 120})
        if status == 200:
            break
        if time.time() > deadline:
            raise SystemExit(f"no runner: {status} {body!r}")
        time.sleep(0.1)
    runner = json.loads(body)["runnerId"]
    try:
        lines = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        sandboxes = {l.split()[0] for l in lines if runner in l and "bwrap" in l}
        agents = [l.split()[0] for l in lines if "agent --listen" in l and "bwrap" not in l and parent(l.split()[0]) in sandboxes]
        if not agents:
            raise SystemExit("the runner's agent was not found (local backend on this machine?)")
        agent = agents[0]
        for command in a.command:
            websocket_run(json.loads(request("POST", f"/runners/{runner}/execute", {"command": command, "timeLimit": 10})[1])["websocketUrl"], a.token)
            agent0, server0, walls = cpu_ms(agent), cpu_ms(a.server_pid), []
            for _ in range(a.count):
                t = time.perf_counter()
                status, body = request("POST", f"/runners/{runner}/execute", {"command": command, "timeLimit": 10})
                final = websocket_run(json.loads(body)["websocketUrl"], a.token)
                walls.append((time.perf_counter() - t) * 1000)
                if final != {"type": "exit", "data": 0}:
                    raise SystemExit(f"{command}: {final}")
            agent1, server1 = cpu_ms(agent), cpu_ms(a.server_pid)
            per = lambda x0, x1, i: (x1[i] - x0[i]) / a.count
            print(f"{command}: wall mean {statistics.mean(walls):.2f} ms, p50 {statistics.median(walls):.2f} ms; "
                  f"per execution CPU: agent {per(agent0, agent1, 0) + per(agent0, agent1, 1):.2f} ms, "
                  f"programs {per(agent0, agent1, 2) + per(agent0, agent1, 3):.2f} ms, "
                  f"server {per(server0, server1, 0) + per(server0, server1, 1):.2f} ms")
    finally:
        request("DELETE", f"/runners/{runner}")


if __name__ == "__main__":
    main()
