"""``agentd run`` as a subprocess: SIGHUP with a broken config keeps serving, a good one adds a
template; a rendered file deleted under the running process comes back."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio

from agentd.client import Client
from tests.agentfixture import seed, socket_dir, write_config
from tests.openbao import DevServer
from tests.support import until


def _template(dest: Path, contents: str) -> str:
    return f'\n[[template]]\ndestination = "{dest}"\ncontents = {contents!r}\nmode = "0640"\n'


async def test_sighup_broken_then_good_config_and_deleted_file_restored(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = seed(bao)
    out = tmp_path / "out"
    out.mkdir()
    first, second = out / "first.conf", out / "second.conf"
    sock = socket_dir() / "agentd.sock"
    config = write_config(tmp_path, bao, approle_files, seeded, sock=sock,
                          extra=_template(first, "{{ secret('db').password }}"))
    good = config.read_text()
    log = tmp_path / "agentd.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "agentd", "run", "-c", str(config)],
                                stderr=stderr, stdout=subprocess.DEVNULL)
    try:
        with trio.fail_after(40):
            await until(lambda: first.exists() and sock.exists(), proc=proc)
            assert first.read_text() == seeded.markers["db"]
            config.write_text(good + "\n[[template]]\nbroken = = 1\n")
            proc.send_signal(signal.SIGHUP)
            await until(lambda: "reload refused" in log.read_text(), proc=proc)

            def get() -> object:
                with Client.connect(sock, timeout=5) as client:
                    return client.get("db", "password")["data"]

            assert await trio.to_thread.run_sync(get) == seeded.markers["db"]
            config.write_text(good + _template(second, "{{ secret('other').value }}"))
            proc.send_signal(signal.SIGHUP)
            await until(lambda: second.exists(), proc=proc)
            assert second.read_text() == seeded.markers["other"]
            first.unlink()
            await until(lambda: first.exists(), proc=proc)
            assert first.read_text() == seeded.markers["db"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    text = log.read_text()
    for marker in seeded.markers.values():
        assert marker not in text
