"""A throw-away OpenLDAP server (Debian `slapd`) for the directory tests.

Never the system's slapd service: our own slapd.conf, an mdb database and a TLS
certificate in the test's temp dir, listening on 127.0.0.1 only (ldap:// for StartTLS
and ldaps://), loaded offline with slapadd. The ppolicy overlay is loaded so that
`pwdAccountLockedTime` exists (disabling an account as an OpenLDAP admin does).

The tree (dc=hospital,dc=test):

    ou=people   uid=alice (radiologists), uid=bob (no group), uid=carol (radiologists,
                relay-it), uid=relay-svc ... the service account is cn=relay,ou=services
    ou=groups   cn=radiologists, cn=relay-it (groupOfNames)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.ports import reserve

from .tools import HarnessError, require_tools, tail

SUFFIX: Final = "dc=hospital,dc=test"
ROOT_DN: Final = f"cn=admin,{SUFFIX}"
ROOT_PW: Final = "root-secret"
SERVICE_DN: Final = f"cn=relay,ou=services,{SUFFIX}"
SERVICE_PW: Final = "service-secret"
PEOPLE: Final = f"ou=people,{SUFFIX}"
GROUP: Final = f"cn=radiologists,ou=groups,{SUFFIX}"
ADMIN_GROUP: Final = f"cn=relay-it,ou=groups,{SUFFIX}"
POLICY: Final = f"cn=default,ou=policies,{SUFFIX}"
#: user -> password
PASSWORDS: Final = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw"}
SCHEMAS: Final = ("core", "cosine", "inetorgperson", "nis")
WAIT: Final = 20.0


def user_dn(name: str) -> str:
    return f"uid={name},{PEOPLE}"


def _tree() -> str:
    people = "".join(
        f"dn: {user_dn(u)}\nobjectClass: inetOrgPerson\nuid: {u}\ncn: {u.title()}\n"
        f"sn: {u.title()}\nuserPassword: {pw}\n\n"
        for u, pw in PASSWORDS.items()
    )
    return (
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: hospital\n"
        "o: Hospital\n\n"
        f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n"
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n\n"
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n\n"
        f"dn: ou=policies,{SUFFIX}\nobjectClass: organizationalUnit\nou: policies\n\n"
        f"dn: {POLICY}\nobjectClass: pwdPolicy\nobjectClass: device\ncn: default\n"
        "pwdAttribute: userPassword\npwdLockout: TRUE\n\n"
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: relay\nuserPassword: {SERVICE_PW}\n\n"
        + people
        + f"dn: {GROUP}\nobjectClass: groupOfNames\ncn: radiologists\n"
        f"member: {user_dn('alice')}\nmember: {user_dn('carol')}\nmember: {user_dn('dave')}\n\n"
        f"dn: {ADMIN_GROUP}\nobjectClass: groupOfNames\ncn: relay-it\n"
        f"member: {user_dn('carol')}\n\n"
    )


def _conf(d: Path) -> str:
    schemas = "".join(f"include /etc/ldap/schema/{s}.schema\n" for s in SCHEMAS)
    return (
        schemas + f"pidfile {d}/slapd.pid\nargsfile {d}/slapd.args\n"
        "modulepath /usr/lib/ldap\nmoduleload back_mdb\nmoduleload ppolicy\n"
        f"TLSCACertificateFile {d}/ca.crt\nTLSCertificateFile {d}/server.crt\n"
        f"TLSCertificateKeyFile {d}/server.key\n"
        # Simple binds only over TLS (StartTLS or ldaps), as a hospital's should be.
        "security simple_bind=128\n"
        "database mdb\nmaxsize 16777216\n"
        f'suffix "{SUFFIX}"\nrootdn "{ROOT_DN}"\nrootpw {ROOT_PW}\ndirectory {d}/db\n'
        f'overlay ppolicy\nppolicy_default "{POLICY}"\n'
        "access to attrs=userPassword by anonymous auth by * none\n"
        "access to * by users read by * none\n"
    )


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(d: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A throw-away CA and a server certificate for `names` (IPs and DNS names)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test directory CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    d.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(d / "ca.crt", d / "server.crt", d / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files


@dataclass
class Slapd:
    """One running slapd; `url` (StartTLS) and `ldaps_url`; stop() or kill() it."""

    directory: Path
    tls: TlsFiles
    port: int
    ldaps_port: int
    process: subprocess.Popen[bytes] | None = None
    _reserved: list[socket.socket] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def log(self) -> Path:
        return self.directory / "slapd.log"

    def start(self) -> None:
        """Start slapd in the foreground (-d 0) on our ports; wait until it answers."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "slapd",
                    "-f",
                    str(self.directory / "slapd.conf"),
                    "-h",
                    f"{self.url}/ {self.ldaps_url}/",
                    "-d",
                    "0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(f"slapd exited ({self.process.returncode}):\n{tail(self.log)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise HarnessError(f"slapd did not listen within {WAIT:g} s:\n{tail(self.log)}")

    def kill(self) -> None:
        """SIGKILL: an outage, as abrupt as a crashed server."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(WAIT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        for sock in self._reserved:
            sock.close()

    def modify(self, ldif: str) -> None:
        """ldapmodify as the root DN over StartTLS (-ZZ: TLS required)."""
        env = dict(os.environ, LDAPTLS_CACERT=str(self.tls.ca), LDAPTLS_REQCERT="demand")
        done = subprocess.run(
            ["ldapmodify", "-x", "-ZZ", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PW],
            input=ldif.encode(),
            env=env,
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
        if done.returncode != 0:
            raise HarnessError(f"ldapmodify failed: {done.stderr.decode(errors='replace')}")

    def lock(self, user: str) -> None:
        """Disable `user` as an OpenLDAP admin does (ppolicy's permanent lock)."""
        self.modify(
            f"dn: {user_dn(user)}\nchangetype: modify\nreplace: pwdAccountLockedTime\n"
            "pwdAccountLockedTime: 000001010000Z\n"
        )

    def remove_member(self, user: str, group: str = GROUP) -> None:
        self.modify(f"dn: {group}\nchangetype: modify\ndelete: member\nmember: {user_dn(user)}\n")

    def delete(self, user: str) -> None:
        self.modify(f"dn: {user_dn(user)}\nchangetype: delete\n")


def start_slapd(directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Slapd:
    """A slapd with the test tree and a certificate for `names`, started; close() it
    (a fixture does)."""
    require_tools("slapd", "slapadd", "ldapmodify")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "db").mkdir(mode=0o700)
    tls = make_tls(directory, names)
    (directory / "slapd.conf").write_text(_conf(directory))
    (directory / "tree.ldif").write_text(_tree())
    loaded = subprocess.run(
        ["slapadd", "-f", str(directory / "slapd.conf"), "-l", str(directory / "tree.ldif")],
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    if loaded.returncode != 0:
        raise HarnessError(f"slapadd failed: {loaded.stderr.decode(errors='replace')}")
    reserved = [reserve(), reserve()]
    server = Slapd(
        directory,
        tls,
        port=reserved[0].getsockname()[1],
        ldaps_port=reserved[1].getsockname()[1],
        _reserved=reserved,
    )
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
