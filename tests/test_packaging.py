"""What ships: the systemd unit, the container image recipe, the deployment examples.

No Docker engine runs here, so the Dockerfile's steps are replayed: its build context (as
.dockerignore filters it) and COPY lines give the source tree, the wheel is built as in its
first stage and installed with the pinned constraints into a fresh venv as in its second,
and the installed daemon is started with the image's environment, health check and signal.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import ServiceConfig, load_config
from tests.dockerfile import Stage, dockerfile_stages
from tests.support import FAKE_KEY, REPO, emails, free_port

UNIT = REPO / "systemd" / "ipqs-bulkd.service"
INSTALLED_EXEC = "/opt/ipqs-bulkd/venv/bin/ipqs-bulkd"
VENV_BIN = Path(sys.executable).parent
MAX_EXPOSURE = 1.5  # "OK"; 1.3 with CAP_LEASE granted and PrivateUsers= off


def tool(name: str) -> str:
    """A command from this venv or the PATH; the test is skipped where it is absent."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def run(*argv: str | Path, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- systemd -------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit, its ExecStart pointed at this venv's ipqs-bulkd (verify wants it to exist)."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXEC} run\n" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_EXEC, tool("ipqs-bulkd")))
    return copy


def test_unit_verifies_clean(unit_copy: Path) -> None:
    analyze = tool("systemd-analyze")
    result = run(analyze, "verify", "--man=no", "--generators=no", unit_copy)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_security_exposure_is_at_most_1_5(unit_copy: Path) -> None:
    analyze = tool("systemd-analyze")
    result = run(analyze, "security", "--offline=yes", "--no-pager", unit_copy)
    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for ipqs-bulkd\.service: (\d+\.\d+)",
                      result.stdout)
    assert found, result.stdout[-2000:]
    assert float(found[1]) <= MAX_EXPOSURE, result.stdout


def test_unit_matches_the_daemon(tmp_path: Path) -> None:
    """The unit's settings agree with what the daemon does and needs."""
    unit = unit_settings(UNIT.read_text())
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["on-failure"]
    assert "2" in unit["RestartPreventExitStatus"][0].split()  # config errors
    assert seconds(unit["WatchdogSec"][0]) > 0
    # Drain time for uploads under way, plus room to close connections.
    assert seconds(unit["TimeoutStopSec"][0]) >= ServiceConfig().shutdown_seconds + 5
    assert unit["StateDirectory"] == ["ipqs-bulkd"]
    assert unit["ConfigurationDirectory"] == ["ipqs-bulkd"]
    assert unit["ReadWritePaths"] == [str(load_config(None, {}).spool.root)]
    credential, _, source = unit["LoadCredential"][0].partition(":")
    assert source == "/etc/ipqs-bulkd/api-key"

    # The Environment= lines, with the credential where systemd puts it, make a config
    # whose key comes from the credential.
    environ = dict(line.split("=", 1) for line in unit["Environment"])
    (tmp_path / credential).write_text(FAKE_KEY + "\n")
    config = load_config(None, {**environ, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.api.key == FAKE_KEY
    # Producers run as other users, unseen behind ProtectProc=: their writers are seen by
    # a lease probe, which needs CAP_LEASE in the initial user namespace (no PrivateUsers).
    assert config.watch.writer_check == "auto"
    assert unit["AmbientCapabilities"] == ["CAP_LEASE"]
    assert unit["CapabilityBoundingSet"] == ["CAP_LEASE"]
    assert unit.get("PrivateUsers", ["no"]) == ["no"]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min)?", value)
    assert match, value
    return float(match[1]) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[match[2]]


def test_sysusers_and_tmpfiles_make_user_and_drop_zone(tmp_path: Path) -> None:
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --root can only chown as root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = run(sysusers, f"--root={root}", REPO / "systemd" / "ipqs-bulkd.sysusers")
    assert result.returncode == 0, result.stderr
    entry = next(line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()
                 if line.startswith("ipqs-bulkd:"))
    uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
    assert home == "/var/lib/ipqs-bulkd"
    result = run(tmpfiles, "--create", f"--root={root}",
                 REPO / "systemd" / "ipqs-bulkd.tmpfiles")
    assert result.returncode == 0, result.stderr
    spool = root / "var" / "lib" / "ipqs-bulkd"
    for folder, mode in [(spool, 0o750), (spool / "inbox", 0o750),
                         *((spool / "inbox" / t, 0o2770) for t in load_config(None, {})
                           .spool.types)]:
        st = folder.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, mode), folder


# -- the container image -------------------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, near enough for an allow-list: the last pattern that matches the
    path or one of its parent folders decides (``!`` re-includes)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        glob = pattern.removeprefix("!")
        if any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def context_files(source: str) -> Iterator[tuple[Path, str]]:
    """The files under ``source`` that reach the build context, with their context paths."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    top = REPO / source
    paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    for path in paths:
        relative = path.relative_to(REPO).as_posix()
        if not dockerignored(relative, patterns):
            yield path, relative


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), REPO / "Dockerfile")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_shape() -> None:
    build, final = dockerfile_stages()
    assert build.name == "build" and build.base == final.base
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", final.base), "pin the base by tag"
    env = final.env()
    assert env["IPQS_BULKD_SPOOL_ROOT"] == "/spool" and final.args("VOLUME") == ["/spool"]
    assert final.args("USER") == ["10001:10001"]
    assert final.args("ENTRYPOINT") == ['["ipqs-bulkd"]'] and final.args("CMD") == ['["run"]']
    assert final.args("STOPSIGNAL") == ["SIGTERM"]
    # The image's environment alone is a valid config; the key comes from the secret file.
    secret = Path(env["IPQS_BULKD_API_KEY_FILE"])
    assert secret == Path("/run/secrets/ipqs_api_key")
    config = load_config(None, {k: v for k, v in env.items() if k.startswith("IPQS_")}
                         | {"IPQS_API_KEY": FAKE_KEY})
    # Never /proc, which shows nothing of the other containers: a lease, else quiet.
    assert (config.health.host, config.watch.writer_check) == ("0.0.0.0", "lease")


def healthcheck_argv(stage: Stage) -> list[str]:
    (line,) = stage.args("HEALTHCHECK")
    command = line.split(" CMD ", 1)[1]
    argv: list[str] = json.loads(command)
    return argv


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's two stages, replayed: a fresh venv with the wheel installed."""
    work = tmp_path_factory.mktemp("image")
    build, final = dockerfile_stages()
    # Stage 1: the COPY lines, from the build context, into WORKDIR; then its RUN.
    workdir = work / "src"
    for copy in build.args("COPY"):
        *sources, dest = copy.split()
        for source in sources:
            files = list(context_files(source))
            assert files, f"{source} is not in the build context (.dockerignore)"
            for path, relative in files:
                inside = relative if dest.endswith("/") else dest + relative[len(source):]
                target = workdir / inside
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    (run_build,) = build.args("RUN")
    assert run_build == "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ."
    wheels = work / "wheels"
    result = run(sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps",
                 "--wheel-dir", wheels, workdir, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    # Stage 2: the venv and the pinned install (the pip cache may help here).
    (run_install,) = final.args("RUN")
    assert "source=constraints.txt" in run_install
    assert "--constraint /constraints.txt" in run_install
    assert list(context_files("constraints.txt")), "constraints.txt is not in the context"
    venv = work / "venv"
    result = run(sys.executable, "-m", "venv", venv)
    assert result.returncode == 0, result.stderr
    result = run(venv / "bin" / "pip", "install", "--constraint", REPO / "constraints.txt",
                 *wheels.glob("*.whl"), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return venv


def pins(lines: str) -> dict[str, str]:
    out = {}
    for line in lines.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


@pytest.mark.slow
def test_fresh_install_pulls_in_only_pinned_dependencies(installed: Path) -> None:
    result = run(installed / "bin" / "pip", "freeze", "--exclude", "ipqs-bulkd")
    assert result.returncode == 0, result.stderr
    installed_versions = pins(result.stdout)
    pinned = pins((REPO / "constraints.txt").read_text())
    unpinned = sorted(set(installed_versions) - set(pinned))
    assert not unpinned, f"add these to constraints.txt: {unpinned}"
    assert installed_versions == {name: pinned[name] for name in installed_versions}


def notifications(sock: socket.socket) -> Iterator[dict[str, str]]:
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        yield dict(line.split("=", 1) for line in data.decode().split("\n"))


@pytest.mark.slow
def test_installed_daemon_runs_like_the_image(installed: Path, tmp_path: Path) -> None:
    """Start the installed command with the image's environment, drop a file, ask the
    image's HEALTHCHECK, and stop it with its STOPSIGNAL."""
    _, final = dockerfile_stages()
    spool, secret, port = tmp_path / "spool", tmp_path / "ipqs_api_key", free_port()
    secret.write_text(FAKE_KEY + "\n")
    config = tmp_path / "config.toml"  # a mounted config file; the ENV lines win over it
    config.write_text("[poll]\ninitial_seconds = 0.2\n[watch]\nquiet_seconds = 0.3\n"
                      "settle_seconds = 0.1\nwriter_check = \"proc\"\n")
    env = final.env()
    env["PATH"] = env["PATH"].replace("/opt/ipqs-bulkd/venv", str(installed)).replace(
        "$PATH", os.environ["PATH"])
    env |= {"IPQS_BULKD_SPOOL_ROOT": str(spool), "IPQS_BULKD_API_KEY_FILE": str(secret),
            "IPQS_BULKD_HEALTH_PORT": str(port), "IPQS_BULKD_CONFIG": str(config),
            "NOTIFY_SOCKET": str(tmp_path / "notify"), "HOME": str(tmp_path)}
    argv = json.loads(final.args("ENTRYPOINT")[0]) + json.loads(final.args("CMD")[0])
    argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
    assert argv[0].startswith(str(installed))
    healthcheck = healthcheck_argv(final)
    healthcheck[0] = shutil.which(healthcheck[0], path=env["PATH"]) or healthcheck[0]

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(env["NOTIFY_SOCKET"])
        systemd.setblocking(False)
        received: list[dict[str, str]] = []

        def ready() -> bool:
            received.extend(notifications(systemd))
            return any("READY" in m for m in received) or daemon.poll() is not None

        with subprocess.Popen([*argv, "--sandbox"], env=env, cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as daemon:
            try:
                wait_until(ready, "READY=1")
                assert daemon.poll() is None, daemon.communicate()[1][-3000:]
                inbox = spool / "inbox" / "email"
                (inbox / ".signups.csv").write_bytes(emails(3))
                (inbox / ".signups.csv").rename(inbox / "signups.csv")
                record = spool / "done" / "email" / "signups.csv.json"
                wait_until(record.exists, "the file in done/")
                assert run(*healthcheck, env=env, timeout=30).returncode == 0
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=10) as resp:
                    metrics = resp.read().decode()
                daemon.send_signal(signal.SIGTERM)
                out, err = daemon.communicate(timeout=ServiceConfig().shutdown_seconds + 10)
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                    daemon.communicate()
        received.extend(notifications(systemd))

    assert daemon.returncode == 0, err[-3000:]
    assert json.loads(record.read_text())["status"] == "FINISHED"
    assert 'ipqs_bulkd_files_total{outcome="done",reason="",type="email"} 1.0' in metrics
    assert received[0]["READY"] == "1" and received[-1]["STOPPING"] == "1"
    # Logs: one JSON object per line off a terminal, and never the key.
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e["event"] == "file_finished" for e in events)
    # The image's ENV wins over the mounted file; the file's other keys still apply.
    mode = next(e for e in events if e["event"] == "writer_check_mode")
    assert mode["mode"] == "lease"  # root here has CAP_LEASE; else the quiet window
    assert mode["window"] == (0.1 if mode["check"] == "lease" else 0.3)
    assert FAKE_KEY not in out + err and "Traceback" not in err
    # The health check really asks the daemon: with the daemon gone it fails.
    assert run(*healthcheck, env=env, timeout=30).returncode != 0


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
MDWE_WRAPPER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(97)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_daemon_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes in the unit: the kernel's PR_SET_MDWE (Linux 6.3+),
    inherited across exec, applies the same rule to a batch run of the daemon."""
    probe = run(sys.executable, "-c", MDWE_WRAPPER, sys.executable, "-c", (
        "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE"
        " | mmap.PROT_EXEC)"))
    if probe.returncode == 97:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert "PermissionError" in probe.stderr  # the rule is in force after exec
    inbox = tmp_path / "spool" / "inbox" / "email"
    inbox.mkdir(parents=True)
    (inbox / "list.csv").write_bytes(emails(2))
    env = {**os.environ, "IPQS_BULKD_SPOOL_ROOT": str(tmp_path / "spool"),
           "IPQS_BULKD_HEALTH_PORT": "0", "IPQS_BULKD_POLL_INITIAL_SECONDS": "0.2",
           "IPQS_BULKD_WATCH_WRITER_CHECK": "quiet", "IPQS_BULKD_WATCH_QUIET_SECONDS": "0.2",
           "IPQS_BULKD_CONFIG": str(tmp_path / "config.toml")}
    (tmp_path / "config.toml").write_text("")
    env.pop("IPQS_API_KEY", None)
    result = run(sys.executable, "-c", MDWE_WRAPPER, tool("ipqs-bulkd"), "run", "--sandbox",
                 "--once", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "spool" / "done" / "email" / "list.csv.json").exists()


# -- examples ------------------------------------------------------------------------------


def test_compose_example_runs_the_sidecar_beside_the_app() -> None:
    compose = yaml.safe_load((REPO / "examples" / "docker-compose.yml").read_text())
    app, sidecar = compose["services"]["app"], compose["services"]["ipqs-bulkd"]
    assert "spool:/spool" in app["volumes"] and "spool:/spool" in sidecar["volumes"]
    assert app["depends_on"]["ipqs-bulkd"]["condition"] == "service_healthy"
    assert sidecar["secrets"] == ["ipqs_api_key"] and "ipqs_api_key" in compose["secrets"]
    assert seconds(sidecar["stop_grace_period"]) > ServiceConfig().shutdown_seconds
    _, final = dockerfile_stages()
    assert sidecar["healthcheck"]["test"] == ["CMD", *healthcheck_argv(final)]
    # The image's environment plus the example's makes a valid config.
    environ = final.env() | sidecar["environment"] | {"IPQS_API_KEY": FAKE_KEY}
    config = load_config(None, {k: v for k, v in environ.items() if k.startswith("IPQS_")})
    assert config.spool.types == ("email", "phone")
    assert app["user"] == final.args("USER")[0]  # both may write the inbox folders


def test_kubernetes_example_shares_the_spool_and_mounts_the_key() -> None:
    docs = list(yaml.safe_load_all((REPO / "examples" / "kubernetes-sidecar.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    (app,) = pod["containers"]
    assert sidecar["restartPolicy"] == "Always"
    assert {"name": "spool", "mountPath": "/spool"} in sidecar["volumeMounts"]
    assert {"name": "spool", "mountPath": "/spool"} in app["volumeMounts"]
    secret = next(v for v in pod["volumes"] if v["name"] == "ipqs-api-key")["secret"]
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "ipqs-api-key")
    assert f"{mount['mountPath']}/{secret['items'][0]['path']}" == "/run/secrets/ipqs_api_key"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "readinessProbe" not in sidecar
    assert pod["terminationGracePeriodSeconds"] > ServiceConfig().shutdown_seconds
    assert pod["securityContext"]["runAsUser"] == 10001
    env = {e["name"]: e["value"] for e in sidecar["env"]} | {"IPQS_API_KEY": FAKE_KEY}
    assert load_config(None, env).watch.writer_check == "lease"

