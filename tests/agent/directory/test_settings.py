"""`directory:` in the agent config: strict, and every error names the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.agent.directory import check_username, user_filter
from relay.agent.directory.filters import check_filter, escape_filter_value
from relay.ops.config import ConfigError

from .conftest import read_settings


def section(tmp_path: Path, **overrides: object) -> dict[str, object]:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("not read at load time\n")
    base: dict[str, object] = {
        "url": "ldaps://dc1.hospital.test",
        "ca": str(ca),
        "bind_dn": "cn=relay,dc=hospital,dc=test",
        "bind_password_file": str(pw),
        "user_base": "ou=people,dc=hospital,dc=test",
        "group": "cn=radiologists,dc=hospital,dc=test",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_defaults_and_the_password_file(tmp_path: Path) -> None:
    s = read_settings(section(tmp_path), tmp_path)
    assert (s.host, s.port, s.use_ssl, s.start_tls) == ("dc1.hospital.test", 636, True, False)
    assert s.bind_password == "s3cret" and s.user_filter == "(uid={user})"
    assert s.admin_group is None and s.disabled_filter is None
    assert s.url == "ldaps://dc1.hospital.test:636"


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        ({"url": "ldap://dc1:389"}, "directory.url", "in the clear"),
        ({"url": "ldaps://dc1", "start_tls": True}, "directory.start_tls", "TLS already"),
        ({"url": "http://dc1"}, "directory.url", "ldaps://"),
        ({"user_filter": "(uid=alice)"}, "directory.user_filter", "{user}"),
        ({"user_filter": "(uid={user}"}, "directory.user_filter", "parenthes"),
        ({"user_filter": "(&(uid={user})(cn={user}))"}, "directory.user_filter", "braces"),
        ({"group": "radiologists"}, "directory.group", "DN"),
        ({"recheck_interval": "0s"}, "directory.recheck_interval", "duration"),
        ({"bind_password_file": "/nonexistent/pw"}, "directory.bind_password_file", "not found"),
        ({"member_attribute": "member)(x"}, "directory.member_attribute", "attribute"),
        ({"colour": "blue"}, "directory.colour", "unknown key"),
    ],
)
def test_bad_values_name_file_and_key(
    tmp_path: Path, overrides: dict[str, object], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        read_settings(section(tmp_path, **overrides), tmp_path)
    assert caught.value.key == key and words in str(caught.value)
    assert str(tmp_path / "agent.yaml") in str(caught.value)


def test_plain_ldap_only_when_asked_for(tmp_path: Path) -> None:
    s = read_settings(section(tmp_path, url="ldap://dc1", insecure_plaintext=True), tmp_path)
    assert not s.encrypted and s.port == 389
    assert read_settings(section(tmp_path, url="ldap://dc1", start_tls=True), tmp_path).encrypted


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_settings(section(tmp_path, bind_password_file=str(tmp_path / "empty")), tmp_path)


def test_user_names_are_checked_and_escaped() -> None:
    assert user_filter("(sAMAccountName={user})", "j.doe") == "(sAMAccountName=j.doe)"
    for bad in ["*", "a)(b=*", "a\x00", "", "-x", "a b", "a,b", "a\\b"]:
        with pytest.raises(ValueError, match="user name"):
            check_username(bad)
    assert escape_filter_value("a*(b)\\\x00") == "a\\2a\\28b\\29\\5c\\00"
    assert check_filter("(pwdAccountLockedTime=*)", placeholder=False)
