"""Throw-away certificates and keys to try a deployment on one machine, and for tests.

Writes into a folder:
- `ca.crt` / `ca.key`: a certificate authority (the SuperNodes' and the CLI's root);
- `superlink.crt` / `superlink.key`: the SuperLink's TLS certificate, signed by the CA,
  whose subject alternative names hold 127.0.0.1, localhost and every `--host` given;
- `<site>` / `<site>.pub`: one EC key pair per site in OpenSSH format, the private key
  for `flower-supernode --auth-supernode-private-key`, the public key for
  `flwr supernode register`.

Real deployments bring certificates from their own CA and keys made at each site
(docs/deployment.md); these expire after 30 days.

    python -m fed_dplora.ops.trial_certs <folder> --sites hospital-a hospital-b [--host H]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 30


def write_trial_certs(folder: str | Path, sites: list[str], hosts: tuple[str, ...] = (),
                      loopback: bool = True) -> Path:
    """The CA, the SuperLink's certificate and one key pair per site, in `folder`
    (`loopback=False`: the certificate names only `hosts`, not 127.0.0.1/localhost)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate(_name("fed-dplora trial CA"), _name("fed-dplora trial CA"),
                      ca_key.public_key(), ca_key, ca=True)
    _write_pair(folder, "ca", ca, ca_key)
    link_key = ec.generate_private_key(ec.SECP384R1())
    link = _certificate(_name("fed-dplora SuperLink"), ca.subject, link_key.public_key(),
                        ca_key, ca=False,
                        hosts=(*(("localhost", "127.0.0.1") if loopback else ()), *hosts))
    _write_pair(folder, "superlink", link, link_key)
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        _write(folder / site, key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()))
        _write(folder / f"{site}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return folder


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signing_key, ca: bool,
                 hosts: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [_san(host) for host in hosts]), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA384())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_pair(folder: Path, stem: str, cert: x509.Certificate, key) -> None:
    _write(folder / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / f"{stem}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    if not path.name.endswith((".crt", ".pub")):
        path.chmod(0o600)  # private keys: owner only


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fed_dplora.ops.trial_certs",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--sites", nargs="+", required=True, help="one key pair each")
    parser.add_argument("--host", action="append", default=[],
                        help="another name or address the SuperLink is reached at")
    args = parser.parse_args()
    print(write_trial_certs(args.folder, args.sites, tuple(args.host)))


if __name__ == "__main__":
    main()
