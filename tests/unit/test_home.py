"""``$MII_HOME`` is trusted only when it is private to this user (``mii_core.deploy.home``):
a shared or foreign home is refused with what to do, files in it are opened without
following links, and records that are not this user's private files are ignored (with a
warning) by ``mii.client(name)``, ``mii list`` and ``mii status``.

Ownership is tested by giving files to another uid, which needs root; the mode checks
run for everyone (root included: they are not permission checks)."""
from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pytest

import mii
from mii.errors import ConfigError, DeploymentNotFoundError
from mii_core import cli
from mii_core.config.models import MIIConfig, ModelConfig
from mii_core.deploy import logs, registry
from mii_core.deploy.registry import DeploymentRecord

OTHER_UID = 65534  # nobody
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


@pytest.fixture
def private_home(tmp_path, monkeypatch):
    """An empty ``$MII_HOME`` of this test (created by mii, so private)."""
    root = tmp_path / "home"
    monkeypatch.setenv("MII_HOME", str(root))
    return registry.mii_home()


def planted(name: str, port: int = 1) -> DeploymentRecord:
    """A record as a planter would write it: no supervisor yet and just created, which
    readers trust for a while (a deployment still starting looks like that)."""
    config = MIIConfig(model_config=ModelConfig(model_name_or_path="tiny"), deployment_name=name)
    return DeploymentRecord(name=name, config=config.model_dump(by_alias=True, mode="json"),
                            host="127.0.0.1", port=port, log_path="/dev/null",
                            created_at=time.time())


def test_mii_creates_its_home_and_folders_0700(tmp_path, monkeypatch):
    monkeypatch.setenv("MII_HOME", str(tmp_path / "a" / "b"))
    old = os.umask(0)  # even a permissive umask must not open them up
    try:
        root = registry.mii_home()
    finally:
        os.umask(old)
    for path in (root, root / "deployments", root / "logs"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


@pytest.mark.parametrize("where", ["", "deployments", "logs"])
def test_a_home_writable_by_others_is_refused_naming_it(private_home, where, capsys):
    folder = private_home / where
    folder.chmod(0o777)
    expected = rf"MII_HOME: refusing to use {folder}: it is writable by others than its owner " \
               rf"\(mode 0777, owner \S+ \(uid {os.geteuid()}\)\).*chmod 700 {folder}"
    with pytest.raises(ConfigError, match=expected):
        registry.mii_home()
    with pytest.raises(ConfigError, match=expected):
        mii.client("anything")
    assert cli.main(["list"]) == 1
    assert f"ConfigError: MII_HOME: refusing to use {folder}" in capsys.readouterr().err


def test_a_group_writable_home_is_refused_a_readable_one_is_not(private_home):
    private_home.chmod(0o750)
    assert registry.mii_home() == private_home
    private_home.chmod(0o770)
    with pytest.raises(ConfigError, match="mode 0770"):
        registry.mii_home()


@as_root
def test_a_home_of_another_user_is_refused(private_home):
    os.chown(private_home, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError, match=rf"refusing to use {private_home}: it belongs to "
                                          rf"\S* ?\(?uid {OTHER_UID}\)?, not to you"):
        registry.mii_home()


def test_a_record_others_may_read_or_write_is_ignored_and_reported_once(private_home, caplog):
    path = registry.save(planted("shared"))
    assert registry.load("shared") is not None
    path.chmod(0o666)
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert registry.load("shared") is None
        assert registry.find_live("shared") is None
        assert registry.list_records() == []
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"ignoring deployment record: MII_HOME: refusing to use {path}: it is "
                        "writable by others than its owner (mode 0666); remove it"]
    with pytest.raises(DeploymentNotFoundError, match="registry record of 'shared' is unreadable"
                                                      ".*writable by others"):
        mii.client("shared")
    assert path.exists()  # not ours to delete: whoever planted it may look


@as_root
def test_a_record_of_another_user_is_not_trusted_by_client_list_or_status(private_home, capsys):
    path = registry.save(planted("planted", port=4242))
    assert mii.client("planted").port == 4242  # a record of ours is trusted ...
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(DeploymentNotFoundError, match=f"belongs to nobody \\(uid {OTHER_UID}\\)"):
        mii.client("planted")  # ... another user's never receives the token and prompts
    assert cli.main(["list"]) == 0
    assert cli.main(["status", "planted"]) == 1
    out, err = capsys.readouterr()
    assert out == "no deployments\n" and "DeploymentNotFoundError" in err


def test_a_link_at_a_record_path_is_not_followed(private_home, tmp_path, caplog):
    elsewhere = registry.save(planted("linked"), tmp_path / "elsewhere.json")
    registry.record_path("linked").symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert registry.load("linked") is None
    assert f"{registry.record_path('linked')} is a symbolic link" in caplog.text


def test_a_log_is_read_without_following_links(private_home, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("not for the log reader\n")
    link = registry.log_path("peek")
    link.symlink_to(secret)
    assert logs.tail(link) == ""
    assert logs.ProgressFollower(link).new_lines() == []


def test_open_private_makes_a_written_file_0600_through_its_descriptor(private_home):
    from mii_core.deploy import home

    path = registry.log_path("loose")
    path.write_text("old\n")
    path.chmod(0o644)
    os.close(home.open_private(path, os.O_WRONLY | os.O_APPEND))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)  # a reader does not repair: it refuses
    with pytest.raises(ConfigError, match="readable by others"):
        home.read_private(path)
    os.link(path, private_home / "hard-link")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="has 2 hard links"):
        home.read_private(path)


def test_a_fifo_planted_at_the_log_path_neither_blocks_nor_is_used(private_home):
    from mii_core.deploy import home

    fifo = registry.log_path("fifo")
    os.mkfifo(fifo, 0o600)
    with pytest.raises(OSError) as caught:  # a writer without a reader, at once
        home.open_private(fifo, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert caught.value.errno == errno.ENXIO
    with pytest.raises(ConfigError, match="is not a regular file"):
        home.open_private(fifo, os.O_RDONLY)
