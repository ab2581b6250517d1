"""The directory client against a real slapd over real TLS (StartTLS and ldaps)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from relay.agent.directory import (
    Directory,
    DirectoryError,
    DirectorySettings,
    DirectoryUnavailable,
    DirectoryUser,
    Refusal,
    RefusalReason,
    UserStatus,
)
from tests.interop.harness.slapd import (
    GROUP,
    PASSWORDS,
    Slapd,
    make_tls,
    start_slapd,
    user_dn,
)

from .blackhole import Trickle
from .conftest import directory_section, read_settings
from .fakeldap import PEOPLE, USER_DN, FakeLdap


def refusal(result: DirectoryUser | Refusal) -> RefusalReason:
    return refused(result).reason


def refused(result: DirectoryUser | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


async def test_a_member_of_the_group_is_authenticated(settings: DirectorySettings) -> None:
    user = await Directory(settings).authenticate("alice", PASSWORDS["alice"])
    assert user == DirectoryUser("alice", user_dn("alice"), in_group=True, is_admin=False)


async def test_ldaps_and_the_admin_group(slapd: Slapd, tmp_path: Path) -> None:
    settings = read_settings(
        directory_section(slapd, tmp_path, url=slapd.ldaps_url, start_tls=None), tmp_path
    )
    directory = Directory(settings)
    carol = await directory.authenticate("carol", PASSWORDS["carol"], admin=True)
    assert isinstance(carol, DirectoryUser) and carol.is_admin and carol.in_group
    assert await directory.is_admin("carol")
    assert not await directory.is_admin("alice")
    alice = await directory.authenticate("alice", PASSWORDS["alice"], admin=True)
    assert refusal(alice) is RefusalReason.NOT_IN_GROUP


async def test_refusals_name_one_reason(settings: DirectorySettings) -> None:
    directory = Directory(settings)
    assert refusal(await directory.authenticate("alice", "nope")) is RefusalReason.WRONG_PASSWORD
    unknown = refused(await directory.authenticate("mallory", "x"))
    assert refusal(unknown) is RefusalReason.UNKNOWN_USER
    assert unknown.message == "wrong password"  # never tells who exists
    bob = refused(await directory.authenticate("bob", PASSWORDS["bob"]))
    assert refusal(bob) is RefusalReason.NOT_IN_GROUP and bob.message == "not in group"
    # An empty password would be an unauthenticated bind, which slapd accepts.
    assert refusal(await directory.authenticate("alice", "")) is RefusalReason.WRONG_PASSWORD


@pytest.mark.parametrize("name", ["*", "alice)(uid=*", "al*", "alice\x00", "(uid=*)", "a" * 65])
async def test_no_user_name_changes_the_filter(settings: DirectorySettings, name: str) -> None:
    directory = Directory(settings)
    assert refusal(await directory.authenticate(name, PASSWORDS["alice"])) is (
        RefusalReason.UNKNOWN_USER
    )
    assert await directory.lookup(name) is UserStatus.DELETED


async def test_lookup_follows_the_directory(slapd: Slapd, settings: DirectorySettings) -> None:
    directory = Directory(settings)
    assert await directory.lookup("alice") is UserStatus.ACTIVE
    assert await directory.lookup("bob") is UserStatus.NOT_IN_GROUP
    assert await directory.lookup("mallory") is UserStatus.DELETED
    slapd.lock("alice")
    assert await directory.lookup("alice") is UserStatus.DISABLED
    assert refusal(await directory.authenticate("alice", PASSWORDS["alice"])) is (
        RefusalReason.DISABLED
    )
    slapd.remove_member("dave")
    assert await directory.lookup("dave") is UserStatus.NOT_IN_GROUP
    slapd.delete("carol")
    assert await directory.lookup("carol") is UserStatus.DELETED


async def test_an_outage_is_unavailable_never_a_verdict(
    slapd: Slapd, settings: DirectorySettings
) -> None:
    directory = Directory(replace(settings, timeout=2.0))
    slapd.kill()
    with pytest.raises(DirectoryUnavailable):
        await directory.lookup("alice")
    result = refused(await directory.authenticate("alice", PASSWORDS["alice"]))
    assert result.reason is RefusalReason.UNAVAILABLE
    assert result.message == "directory unavailable"


async def test_a_directory_back_from_an_outage_answers_at_once(
    slapd: Slapd, settings: DirectorySettings
) -> None:
    """ldap3 marks an address that failed as unavailable for the next seconds; one
    Server object shared by every operation made a directory that was back look down
    ("invalid server address") a while longer."""
    directory = Directory(replace(settings, timeout=2.0))
    assert await directory.is_admin("carol")
    slapd.kill()
    with pytest.raises(DirectoryUnavailable):
        await directory.is_admin("carol")
    slapd.start()
    assert await directory.is_admin("carol")
    assert await directory.lookup("alice") is UserStatus.ACTIVE
    directory.close()


async def test_a_missing_group_is_an_error_not_a_verdict(settings: DirectorySettings) -> None:
    directory = Directory(replace(settings, group="cn=gone,ou=groups,dc=hospital,dc=test"))
    with pytest.raises(DirectoryError):
        await directory.lookup("alice")
    assert await Directory(settings).lookup("alice") is UserStatus.ACTIVE  # as a control


async def test_a_wrong_service_password_is_unavailable(settings: DirectorySettings) -> None:
    with pytest.raises(DirectoryUnavailable, match="service bind"):
        await Directory(replace(settings, bind_password="wrong")).lookup("alice")


async def test_the_server_certificate_is_checked(
    slapd: Slapd, settings: DirectorySettings, tmp_path: Path
) -> None:
    other = make_tls(tmp_path / "other-ca")
    with pytest.raises(DirectoryUnavailable, match="certificate verify failed"):
        await Directory(replace(settings, ca=other.ca)).lookup("alice")
    assert await Directory(settings).lookup("alice") is UserStatus.ACTIVE  # as a control


@pytest.mark.parametrize("ldaps", [False, True])
async def test_the_server_name_is_checked(tmp_path: Path, ldaps: bool) -> None:
    # A certificate for "localhost" only: dialling 127.0.0.1 must fail, by name.
    server = start_slapd(tmp_path / "slapd", names=("localhost",))
    try:
        section = directory_section(server, tmp_path)
        if ldaps:
            section.update(url=server.ldaps_url)
            section.pop("start_tls")
        settings = read_settings(section, tmp_path)
        with pytest.raises(DirectoryUnavailable, match=r"not valid for the name 127\.0\.0\.1"):
            await Directory(settings).lookup("alice")
        assert await Directory(replace(settings, host="localhost")).lookup("alice") is (
            UserStatus.ACTIVE
        )
    finally:
        server.close()


def test_group_fixture_is_the_configured_group(settings: DirectorySettings) -> None:
    assert settings.group == GROUP


async def test_a_locked_account_is_a_refusal_without_the_disabled_filter(
    slapd: Slapd, settings: DirectorySettings
) -> None:
    """slapd answers a locked account's bind with 49, as Active Directory does (with
    "data 775"): a refusal, never the directory's outage."""
    slapd.lock("alice")
    directory = Directory(replace(settings, disabled_filter=None))
    result = refused(await directory.authenticate("alice", PASSWORDS["alice"]))
    assert result.reason is RefusalReason.WRONG_PASSWORD
    directory.close()


@pytest.mark.parametrize(
    ("code", "name"),
    [(51, "busy"), (52, "unavailable"), (53, "unwillingToPerform"), (80, "other"), (1, "")],
)
async def test_a_bind_answered_busy_is_unavailable_not_a_wrong_password(
    code: int, name: str
) -> None:
    """Only 49 is the directory's no to a password: a user bind answered busy,
    unavailable, unwilling, other (or anything unexpected) used to be a wrong password,
    which locked IT out of its pages and spent an enrollment code's tries in an outage."""
    ldap = await FakeLdap(code, "server busy").start()
    directory = Directory(ldap.settings())
    try:
        for admin in (False, True):
            result = refused(await directory.authenticate("alice", "right", admin=admin))
            assert result.reason is RefusalReason.UNAVAILABLE, result
            assert result.message == "directory unavailable"
            assert f"({code})" in result.detail and name in result.detail
        assert ldap.user_binds == 2
        # As a control: the fake server's own success is a user.
        ldap.user_bind = (0, "")
        assert isinstance(await directory.authenticate("alice", "right"), DirectoryUser)
    finally:
        directory.close()
        await ldap.close()


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        ("80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 52e, v4563",
         "data 52e: invalid credentials"),
        ("80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 533, v4563",
         "data 533: account disabled"),
        ("80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 775, v4563",
         "data 775: account locked"),
        ("", "refused"),
    ],
)  # fmt: skip
async def test_active_directorys_49_stays_a_refusal(message: str, detail: str) -> None:
    """Active Directory refuses a disabled, expired or locked account with 49 and a data
    code: a refusal (counted as a wrong password), the data code in the audit detail."""
    ldap = await FakeLdap(49, message).start()
    directory = Directory(ldap.settings())
    try:
        result = refused(await directory.authenticate("alice", "whatever"))
        assert result.reason is RefusalReason.WRONG_PASSWORD
        assert result.message == "wrong password"
        assert result.detail.endswith(detail), result.detail
    finally:
        directory.close()
        await ldap.close()


@pytest.mark.parametrize("entries", [0, 1])
async def test_an_answer_cut_short_by_the_servers_size_limit_is_no_verdict(entries: int) -> None:
    """sizeLimitExceeded (4) with fewer entries than we asked for is the server's own
    limit cutting the answer: with none, the user was taken as deleted (the re-check
    revokes their devices); with one, as the only one."""
    ldap = await FakeLdap(0).start()
    directory = Directory(ldap.settings())
    try:
        assert await directory.lookup("alice") is UserStatus.ACTIVE  # as a control
        ldap.user_search = (entries, 4)
        with pytest.raises(DirectoryError, match="cut its answer short"):
            await directory.lookup("alice")
        assert refusal(await directory.authenticate("alice", "x")) is RefusalReason.UNAVAILABLE
        ldap.user_search = (2, 4)  # two of more: "more than one", an error as before
        with pytest.raises(DirectoryError, match="more than one"):
            await directory.lookup("alice")
    finally:
        directory.close()
        await ldap.close()


async def test_a_caller_that_stops_waiting_frees_its_connection(
    settings: DirectorySettings,
) -> None:
    """An IT login gives up after 15 s, but its worker thread went on reading a
    directory that trickles bytes (ldap3's timeout is per read) and held its slot for
    ever: four such logins and no one could log in. Now the caller's timeout cuts the
    operation's connection and the slot is free again at once."""
    trickle = await Trickle(every=0.2).start()
    try:
        directory = Directory(replace(trickle.settings(settings, timeout=1.0), max_connections=1))
        for _ in range(2):  # the second gets the one slot the first had
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await directory.authenticate("carol", PASSWORDS["carol"], admin=True)
            async with asyncio.timeout(1.0):  # cut, not left dripping
                await trickle.idle.wait()
        assert trickle.connections == 2
        directory.close()
    finally:
        await trickle.close()


async def test_an_unknown_user_costs_the_bind_a_wrong_password_costs() -> None:
    """A login for a name the directory does not have was refused without a user bind,
    in half the time of a wrong password: the time told which names exist. Now it binds
    too, as a throwaway DN (no account's lockout counts it), and is still refused as a
    wrong password."""
    ldap = await FakeLdap(49).start()
    directory = Directory(ldap.settings(disabled_filter="(pwdAccountLockedTime=*)"))
    try:
        wrong = refused(await directory.authenticate("alice", "wrong", admin=True))
        assert wrong.reason is RefusalReason.WRONG_PASSWORD and ldap.bound == [USER_DN]
        ldap.user_search = (0, 0)  # no such user
        for _ in range(2):
            unknown = refused(await directory.authenticate("mallory", "wrong", admin=True))
            assert unknown.reason is RefusalReason.UNKNOWN_USER
            assert unknown.message == wrong.message
        assert ldap.user_binds == 3
        first, second = ldap.bound[1:]
        assert first != second and first.startswith("cn=relay-no-such-user-")
        assert first.endswith(f",{PEOPLE}") and "mallory" not in first
    finally:
        directory.close()
        await ldap.close()
