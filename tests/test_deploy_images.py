"""deploy/'s images: the Dockerfiles' conventions, the extras they install (no torch), the
build context (.dockerignore), and the container health check (deploy/healthcheck.py) run
against a real gRPC health service and an HTTP stub. The compose file and manifests:
tests/test_deploy.py.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda")
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002

# ---------------------------------------------------------------------------------------
# Dockerfiles and build context
# ---------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))  # fmt: skip
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip()]  # fmt: skip


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(path):
    instructions = dockerfile_instructions(path)
    keywords = [keyword for keyword, _ in instructions]
    # ARG BASE_IMAGE before the first FROM, and every stage built from it: the container
    # tool (and any air-gapped build) swaps the base with --build-arg BASE_IMAGE=...
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE=")
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) == 2, "multi-stage: a builder and a final stage"
    assert all(args.split()[0] == "${BASE_IMAGE}" for args in froms)
    final = instructions[keywords.index("FROM", keywords.index("FROM") + 1):]
    final_args = dict(reversed(final))  # first occurrence of each keyword in the final stage

    user = final_args["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root USER (runAsNonRoot can check it)"
    assert sorted(final_args["EXPOSE"].split()) == [str(HTTP_PORT), str(GRPC_PORT), str(METRICS_PORT)]
    assert "healthcheck.py" in final_args["HEALTHCHECK"]
    # Exec form, so SIGTERM reaches the server itself rather than a shell.
    assert json.loads(final_args["ENTRYPOINT"]) == ["server"]
    assert final_args.get("STOPSIGNAL", "SIGTERM") == "SIGTERM"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for keyword, args in final if keyword == "ENV")))
    assert env["ENSEMBLE_SERVER_MODEL_REPOSITORY"] == "/models"
    assert int(env["ENSEMBLE_SERVER_HTTP_PORT"]) == HTTP_PORT
    assert int(env["ENSEMBLE_SERVER_GRPC_PORT"]) == GRPC_PORT
    assert int(env["ENSEMBLE_SERVER_METRICS_PORT"]) == METRICS_PORT
    # Only the virtualenv crosses into the final stage; no pip install there.
    assert not any(keyword == "RUN" and "pip install" in args for keyword, args in final)
    assert any(keyword == "COPY" and args.startswith("--from=builder /opt/venv") for keyword, args in final)


def test_image_extras_leave_torch_out():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "ensemble-serving[gpu]" not in extras["server"]
    for extra in ("server", "gpu"):
        assert not [req for req in extras[extra] if re.match(r"(torch|torchvision|ensemble-serving)\b", req)]
    assert any(req.startswith("onnxruntime-gpu") for req in extras["gpu"])
    assert not any(re.match(r"onnxruntime\b(?!-gpu)", req) for req in extras["gpu"]), "never both runtimes"
    assert "pip install --no-deps ." in (DEPLOY / "Dockerfile.cuda").read_text()


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our file: the last matching pattern wins; `!` re-includes;
    a pattern matches a path or any folder above it."""
    import fnmatch

    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            allowed = negate
    return allowed


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    for heavy in (".venv/bin/python", "runs/a/model.safetensors", "model_repository/m/1/model.onnx",
                  "outputs/x.png", ".git/HEAD", "tests/test_deploy.py", "server/__pycache__/a.pyc"):
        assert not dockerignore_allows(heavy, patterns), f"{heavy} would be sent to the build"
    for path in DOCKERFILES:
        for keyword, args in dockerfile_instructions(path):
            if keyword == "COPY" and not args.startswith("--from"):
                for source in shlex.split(args)[:-1]:
                    assert dockerignore_allows(source, patterns), f"{path.name} copies {source}, .dockerignore drops it"
    assert dockerignore_allows("server/process/cli.py", patterns)


# ---------------------------------------------------------------------------------------
# The image's health check, against a real gRPC health service
# ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_healthcheck(*args: str, grpc_port: int = 1, http_port: int = 1) -> subprocess.CompletedProcess:
    env = {"ENSEMBLE_SERVER_GRPC_PORT": str(grpc_port), "ENSEMBLE_SERVER_HTTP_PORT": str(http_port),
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), *args],
                          capture_output=True, text=True, env=env, timeout=30)  # fmt: skip


def test_healthcheck_follows_the_http_ready_endpoint():
    """By default: GET /v2/health/ready on the HTTP port must answer 200."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = {"status": 503}

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(answer["status"] if self.path == "/v2/health/ready" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = server.server_address[1]
    try:
        result = run_healthcheck(http_port=port)  # loading or draining
        assert result.returncode == 1 and "503 (not ready)" in result.stdout
        answer["status"] = 200
        result = run_healthcheck(http_port=port)
        assert result.returncode == 0 and "200 (ready)" in result.stdout, result.stdout + result.stderr
    finally:
        server.shutdown()
        server.server_close()
    result = run_healthcheck(http_port=port)  # nobody listening
    assert result.returncode == 1 and "unhealthy" in result.stdout


def test_healthcheck_follows_the_grpc_health_service():
    """With --grpc, or when HTTP is turned off (port 0): grpc.health.v1 must say SERVING."""
    grpc = pytest.importorskip("grpc")
    health_module = pytest.importorskip("grpc_health.v1.health")
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    servicer = health_module.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        result = run_healthcheck("--grpc", grpc_port=port)
        assert result.returncode == 1 and "NOT_SERVING" in result.stdout

        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        for result in (run_healthcheck("--grpc", grpc_port=port), run_healthcheck(grpc_port=port, http_port=0)):
            assert result.returncode == 0, result.stdout + result.stderr
            assert "SERVING" in result.stdout

        result = run_healthcheck("--grpc", "no-such-model", grpc_port=port)  # unknown service: NOT_FOUND
        assert result.returncode == 1 and "NOT_FOUND" in result.stdout
    finally:
        server.stop(grace=None)
    result = run_healthcheck("--grpc", grpc_port=port)  # nobody listening
    assert result.returncode == 1 and "unhealthy" in result.stdout
