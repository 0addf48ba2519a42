"""Secure Boot with the user's own keys: the PK/KEK/db key pairs, signing a UKI, the files a
user enrolls by hand, and an OVMF variable store with the keys enrolled and Secure Boot on.

    keys      KeySet.locate(env)       where each pair is: LDT_SB_<ROLE>_KEY/_CERT, else the per-user
                                       folder (key_dir()), never cache/ nor the repository
              ensure_keys()            make the missing pairs there (openssl, RSA 2048), check all
              check_pair()             missing file, key without cert, not a cert, expired, mismatch
              fingerprint()            SHA-256 of the db certificate: part of the signing stage's key
              summary()                what `doit sb_keys` prints: paths and the db fingerprint
    signing   sbsign_cmd()/sign()      sbsign under a clock frozen at the stage's epoch (faketime):
                                       sbsign stamps a PKCS#7 signingTime, the rest is deterministic
              sbverify_cmd()/verify()
    enroll    enrollment_files()       PK/KEK/db as .cer (DER), .esl and signed .auth
    firmware  virt_fw_vars_cmd()/make_vars()  OVMF_VARS_4M.fd + PK, KEK, db, Secure Boot enforced
              (booting it: firmware.find_secboot_ovmf(), qemu.pflash_args() with q35 and SMM)
    stages    located()/fingerprints() what the uefi and sb_vars stages' keys hold: the certificates'
                                       fingerprints, never a key's path or content

Private keys are only ever read by the openssl and sbsign processes: Python never opens one,
nothing copies one anywhere, and a command line names a key by its path only, so LDT_VERBOSE=1
echoes paths, never contents. The keys are passphrase-less PEM files, 0600 in a 0700 folder.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import os
import shutil
import struct
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.run import log, run

if TYPE_CHECKING:
    from cryptography import x509

KEY_BITS = 2048
MAKE_KEYS = "a signed build makes them: `doit build_efistub:NAME` with [boot] secure_boot = true"
VALIDITY_DAYS = 3650
OWNER_NAMESPACE = uuid.UUID("0c5f6a38-3e0d-5b6e-9c1e-5b1d2a9e4f70")  # owner GUIDs: uuid5 of the PK fingerprint

OVMF_VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
OVMF_HINT = "install Debian's ovmf package (run ./setup.sh)"

# Lines a boot shows: the kernel's own (arch/x86/kernel/setup.c, Debian's lockdown patch) and OVMF's
# when DxeImageVerificationLib refuses the image (BdsDxe: "failed to load Boot0001 ...: Access Denied").
KERNEL_SECURE_BOOT_LINE = "secureboot: Secure boot enabled"
KERNEL_LOCKDOWN_LINE = "Kernel is locked down from EFI Secure Boot"
FIRMWARE_REFUSAL_MARKERS = ("Access Denied", "Security Violation")

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_TYPE_PKCS7_GUID = uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7")
# NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS | TIME_BASED_AUTHENTICATED_WRITE_ACCESS
AUTH_VAR_ATTRS = 0x01 | 0x02 | 0x04 | 0x20


class Role(enum.StrEnum):
    """The three Secure Boot keys; each .auth file is signed by its `signer`'s key."""

    PK = "PK"
    KEK = "KEK"
    DB = "db"

    @property
    def subject(self) -> str:
        names = {Role.PK: "Platform Key", Role.KEK: "Key Exchange Key", Role.DB: "Signature Database Key"}
        return f"/CN=Linux Distro Tools {names[self]}/"

    @property
    def env_key(self) -> str:
        return f"LDT_SB_{self.name}_KEY"

    @property
    def env_cert(self) -> str:
        return f"LDT_SB_{self.name}_CERT"

    @property
    def signer(self) -> Role:
        return Role.KEK if self is Role.DB else Role.PK

    @property
    def vendor_guid(self) -> uuid.UUID:
        return EFI_IMAGE_SECURITY_DATABASE if self is Role.DB else EFI_GLOBAL_VARIABLE


@dataclass(frozen=True)
class KeyPair:
    role: Role
    key: Path  # PEM private key, read only by openssl/sbsign
    cert: Path  # PEM (or DER) X.509 certificate
    from_env: bool = False

    @property
    def origin(self) -> str:
        return f"{self.role.env_key}/{self.role.env_cert}" if self.from_env else str(self.key.parent)


@dataclass(frozen=True)
class KeySet:
    pk: KeyPair
    kek: KeyPair
    db: KeyPair

    def __getitem__(self, role: Role) -> KeyPair:
        return {Role.PK: self.pk, Role.KEK: self.kek, Role.DB: self.db}[role]

    @property
    def pairs(self) -> tuple[KeyPair, KeyPair, KeyPair]:
        return (self.pk, self.kek, self.db)

    @classmethod
    def locate(cls, env: Mapping[str, str], directory: Path) -> KeySet:
        """Where each pair is (pure): both LDT_SB_<ROLE>_KEY and _CERT set, else directory/<role>.key/.crt."""
        return cls(*(_locate(role, env, directory) for role in Role))


def _locate(role: Role, env: Mapping[str, str], directory: Path) -> KeyPair:
    key, cert = env.get(role.env_key, ""), env.get(role.env_cert, "")
    if key and not cert:
        raise UserError(f"{role.env_key} is set but {role.env_cert} is not: a key without its certificate",
                        hint=f"point {role.env_cert} at the {role} certificate (PEM) too")
    if cert and not key:
        raise UserError(f"{role.env_cert} is set but {role.env_key} is not",
                        hint=f"point {role.env_key} at the {role} private key (PEM) too")
    if key:
        return KeyPair(role, Path(key), Path(cert), from_env=True)
    return KeyPair(role, directory / f"{role}.key", directory / f"{role}.crt")


def key_dir(env: Mapping[str, str] | None = None) -> Path:
    """The per-user key folder: $LDT_SB_DIR, else $XDG_DATA_HOME/ldt/secureboot, else
    ~/.local/share/ldt/secureboot (outside cache/ and the repository, never stored or pushed)."""
    env = os.environ if env is None else env
    if env.get("LDT_SB_DIR"):
        return Path(env["LDT_SB_DIR"])
    data = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else Path(env.get("HOME", "~")) / ".local/share"
    return data.expanduser() / "ldt" / "secureboot"


# ── keys ────────────────────────────────────────────────────────────────────────────────


def keygen_cmd(role: Role, key: Path, cert: Path, *, days: int = VALIDITY_DAYS) -> list[str]:
    """A passphrase-less RSA key and its self-signed certificate (openssl writes the key 0600)."""
    return ["openssl", "req", "-new", "-x509", "-newkey", f"rsa:{KEY_BITS}", "-nodes", "-sha256",
            "-days", str(days), "-subj", role.subject, "-keyout", os.fspath(key), "-out", os.fspath(cert)]


def pubkey_cmd(key: Path) -> list[str]:
    """The public half of a private key, DER on stdout (the private key never leaves openssl)."""
    return ["openssl", "pkey", "-in", os.fspath(key), "-pubout", "-outform", "DER"]


def make_pair(role: Role, directory: Path) -> KeyPair:
    """A new pair in `directory` (made 0700), the key 0600; refuses to overwrite either file."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    pair = KeyPair(role, directory / f"{role}.key", directory / f"{role}.crt")
    if pair.key.exists() or pair.cert.exists():
        raise UserError(f"{pair.key if pair.key.exists() else pair.cert} exists; not overwriting it",
                        hint="remove both files of the pair to make a new one")
    try:
        run(keygen_cmd(role, pair.key, pair.cert), capture=True, umask=0o077)
    except BaseException:
        pair.key.unlink(missing_ok=True)
        pair.cert.unlink(missing_ok=True)
        raise
    os.chmod(pair.key, 0o600)
    os.chmod(pair.cert, 0o644)
    return pair


def ensure_keys(env: Mapping[str, str] | None = None, directory: Path | None = None,
                now: datetime.datetime | None = None) -> KeySet:
    """The key set, its missing pairs in the key folder made first (the first signed
    build: stages.materialize's prepare); every pair is checked before it is used."""
    env = os.environ if env is None else env
    keys = KeySet.locate(env, directory or key_dir(env))
    for pair in keys.pairs:
        if not pair.from_env and not pair.key.exists() and not pair.cert.exists():
            make_pair(pair.role, pair.key.parent)
            log(f"made the Secure Boot {pair.role} key pair: {pair.key} (keep it private), {pair.cert}")
    for pair in keys.pairs:
        check_pair(pair, now)
    return keys


def load_cert(path: Path) -> x509.Certificate:
    """A certificate in PEM or DER; anything else is one line."""
    from cryptography import x509  # here: a no-op doit never pays for importing it (50 ms)

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"certificate {path} not found", hint=MAKE_KEYS) from None
    try:
        if b"-----BEGIN" in data:
            if b"PRIVATE KEY-----" in data and b"CERTIFICATE-----" not in data:
                raise ValueError
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise UserError(f"{path} is not an X.509 certificate",
                        hint="give the PEM or DER certificate here, not the private key") from None


def cert_der(path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return load_cert(path).public_bytes(serialization.Encoding.DER)


def fingerprint(cert: Path) -> str:
    """SHA-256 of the certificate (DER), lowercase hex: what goes into the signing stage's key."""
    return hashlib.sha256(cert_der(cert)).hexdigest()


def check_pair(pair: KeyPair, now: datetime.datetime | None = None) -> None:
    """One line with a hint for: a missing key, a key without its certificate, a file that is no
    certificate, an expired (or not yet valid) certificate, a key that is not the certificate's."""
    where = f"{pair.role} key ({pair.origin})"
    if not pair.key.is_file():
        raise UserError(f"{where}: private key {pair.key} not found",
                        hint=f"{MAKE_KEYS}; or point {pair.role.env_key} at an existing PEM key")
    if not pair.cert.is_file():
        raise UserError(f"{where}: {pair.key} has no certificate ({pair.cert} not found)",
                        hint=f"put the certificate beside it or set {pair.role.env_cert}")
    cert = load_cert(pair.cert)
    now = now or datetime.datetime.now(datetime.UTC)
    if now > cert.not_valid_after_utc:
        raise UserError(f"{where}: certificate {pair.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                        hint="remove both files (the next signed build makes a new pair) and enroll it again")
    if now < cert.not_valid_before_utc:
        raise UserError(f"{where}: certificate {pair.cert} is not valid before "
                        f"{cert.not_valid_before_utc:%Y-%m-%d}", hint="check the clock of this machine")
    proc = run(pubkey_cmd(pair.key), capture=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"{where}: {pair.key} is not a passphrase-less PEM private key",
                        hint="convert it with `openssl pkey -in KEY -out KEY.pem` (no passphrase)")
    from cryptography.hazmat.primitives import serialization

    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    if proc.stdout != spki:
        raise UserError(f"{where}: {pair.key} does not belong to certificate {pair.cert}",
                        hint="the key and the certificate must be made together; check the file names")


def located(env: Mapping[str, str] | None = None) -> KeySet:
    """The key set where it is now (nothing made, nothing checked): for a stage's key."""
    env = os.environ if env is None else env
    return KeySet.locate(env, key_dir(env))


def summary(keys: KeySet) -> str:
    """What `doit sb_keys` prints: where each pair is and the db certificate's fingerprint (what a
    signed image's key holds); paths only, never a key's content."""
    lines = [f"{pair.role}: key {pair.key}, certificate {pair.cert}" + (" (from the environment)" if pair.from_env
                                                                       else "") for pair in keys.pairs]
    lines.append(f"db certificate SHA-256 fingerprint: {fingerprint(keys.db.cert)}")
    return "\n".join(lines)


def fingerprints(keys: KeySet) -> dict[str, str]:
    """{role: SHA-256 of its certificate}: what a signed image's key holds of the keys (a missing
    certificate is a UserError: the first signed build makes the keys, stages.materialize's prepare)."""
    return {str(pair.role): fingerprint(pair.cert) for pair in keys.pairs}


def owner_guid(keys: KeySet) -> uuid.UUID:
    """The SignatureOwner of every enrolled entry: stable for a key set (uuid5 of the PK fingerprint)."""
    return uuid.uuid5(OWNER_NAMESPACE, fingerprint(keys.pk.cert))


# ── signing ─────────────────────────────────────────────────────────────────────────────


def frozen_clock(epoch: int) -> str:
    """`epoch` as faketime's absolute time (read in TZ=UTC)."""
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def sbsign_cmd(pair: KeyPair, src: Path, out: Path, *, epoch: int | None = None) -> list[str]:
    """sbsign of one PE file. sbsign puts a PKCS#7 signingTime (the clock) into the signature, so
    with `epoch` it runs under faketime frozen at that time (env TZ=UTC): same input, same key,
    same epoch -> the same bytes (the RSA PKCS#1 v1.5 signature itself is deterministic)."""
    cmd = ["sbsign", "--key", os.fspath(pair.key), "--cert", os.fspath(pair.cert), "--output", os.fspath(out),
           os.fspath(src)]
    return cmd if epoch is None else [*frozen_clock_cmd(epoch), *cmd]


def frozen_clock_cmd(epoch: int) -> list[str]:
    """A command prefix under which the clock stands still at `epoch` (faketime -f: an absolute time
    is frozen; without -f faketime only starts the clock there, and a big UKI takes over a second)."""
    return ["faketime", "-f", frozen_clock(epoch)]


def sbverify_cmd(cert: Path, efi: Path) -> list[str]:
    return ["sbverify", "--cert", os.fspath(cert), os.fspath(efi)]


def sign(src: Path, out: Path, pair: KeyPair, *, epoch: int | None = None) -> Path:
    """Sign a UKI (any PE image) with the db pair into `out`, atomically."""
    check_pair(pair)
    if epoch is not None and not shutil.which("faketime"):
        raise UserError("faketime not found (reproducible signing freezes sbsign's clock)",
                        hint="apt install faketime (or run ./setup.sh)")
    with atomic_path(out) as tmp:
        run(sbsign_cmd(pair, src, tmp, epoch=epoch), capture=True, env={"TZ": "UTC"})
    return out


def verify(efi: Path, cert: Path) -> bool:
    """Whether `efi` carries a valid signature by `cert`'s key."""
    return run(sbverify_cmd(cert, efi), capture=True, check=False).returncode == 0


# ── files for enrolling by hand ─────────────────────────────────────────────────────────


def signature_list(der: bytes, owner: uuid.UUID) -> bytes:
    """An EFI_SIGNATURE_LIST holding one X.509 certificate (the .esl format of efitools)."""
    entry = owner.bytes_le + der
    header = EFI_CERT_X509_GUID.bytes_le + struct.pack("<III", 28 + len(entry), 0, len(entry))
    return header + entry


def efi_time(when: datetime.datetime) -> bytes:
    """EFI_TIME (16 bytes), UTC, no nanoseconds."""
    w = when.astimezone(datetime.UTC)
    return struct.pack("<HBBBBBBIhBB", w.year, w.month, w.day, w.hour, w.minute, w.second, 0, 0, 0, 0, 0)


def auth_payload(role: Role, timestamp: bytes, esl: bytes) -> bytes:
    """What the .auth signature covers: name (UCS-2) || vendor GUID || attributes || time || data."""
    return (str(role).encode("utf-16-le") + role.vendor_guid.bytes_le + struct.pack("<I", AUTH_VAR_ATTRS)
            + timestamp + esl)


def auth_file(timestamp: bytes, pkcs7_der: bytes, esl: bytes) -> bytes:
    """EFI_VARIABLE_AUTHENTICATION_2 (time + WIN_CERTIFICATE_UEFI_GUID with PKCS#7) then the data."""
    win_cert = struct.pack("<IHH", 24 + len(pkcs7_der), 0x0200, 0x0EF1) + EFI_CERT_TYPE_PKCS7_GUID.bytes_le
    return timestamp + win_cert + pkcs7_der + esl


def smime_sign_cmd(signer: KeyPair, payload: Path, out: Path) -> list[str]:
    """Detached PKCS#7 over `payload`, DER, no signed attributes (no signingTime: deterministic)."""
    return ["openssl", "smime", "-sign", "-binary", "-noattr", "-md", "sha256", "-outform", "DER",
            "-in", os.fspath(payload), "-signer", os.fspath(signer.cert), "-inkey", os.fspath(signer.key),
            "-out", os.fspath(out)]


ENROLL_FILES = tuple(f"{role}{ext}" for role in Role for ext in (".cer", ".esl", ".auth"))


def enrollment_files(keys: KeySet, out_dir: Path, *, epoch: int) -> dict[str, Path]:
    """PK/KEK/db as .cer (DER: what firmware setup menus import), .esl (efi-updatevar, KeyTool)
    and .auth (PK and KEK signed by the PK, db by the KEK; time = epoch), in `out_dir`.
    Same keys and epoch -> the same bytes. Certificates only: no private key is written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    owner = owner_guid(keys)
    stamp = efi_time(datetime.datetime.fromtimestamp(epoch, datetime.UTC))
    out: dict[str, Path] = {}
    for role in Role:
        der = cert_der(keys[role].cert)
        esl = signature_list(der, owner)
        payload = out_dir / f".{role}.payload"
        sig = out_dir / f".{role}.p7"
        try:
            payload.write_bytes(auth_payload(role, stamp, esl))
            run(smime_sign_cmd(keys[role.signer], payload, sig), capture=True)
            blobs = {".cer": der, ".esl": esl, ".auth": auth_file(stamp, sig.read_bytes(), esl)}
        finally:
            payload.unlink(missing_ok=True)
            sig.unlink(missing_ok=True)
        for ext, data in blobs.items():
            path = out_dir / f"{role}{ext}"
            path.write_bytes(data)
            out[path.name] = path
    return out


def esp_enrollment_paths(name: str = "ldt") -> dict[str, str]:
    """Where each enrollment file goes on the ESP (mtools paths): systemd-boot's auto-enroll
    folder /loader/keys/<name>/ for the .auth files, /EFI/keys/ for .cer and .esl."""
    out = {}
    for f in ENROLL_FILES:
        out[f] = f"::/loader/keys/{name}/{f}" if f.endswith(".auth") else f"::/EFI/keys/{f}"
    return out


# ── firmware with the keys enrolled ─────────────────────────────────────────────────────


def virt_fw_vars() -> str:
    """virt-fw-vars of this environment (the venv's, beside its python), else the one on PATH."""
    beside = Path(sys.executable).parent / "virt-fw-vars"
    return os.fspath(beside) if beside.exists() else "virt-fw-vars"


def virt_fw_vars_cmd(template: Path, out: Path, pk: Path, kek: Path, db: Path, owner: uuid.UUID,
                     *, tool: str = "virt-fw-vars") -> list[str]:
    """OVMF vars with only our PK, KEK and db (no Microsoft or distro keys) and Secure Boot on.

    virt-fw-vars stamps each variable with its certificate's notBefore: the same keys and template
    give the same bytes."""
    g = str(owner)
    return [tool, "--input", os.fspath(template), "--output", os.fspath(out),
            "--set-pk", g, os.fspath(pk), "--add-kek", g, os.fspath(kek), "--add-db", g, os.fspath(db),
            "--no-microsoft", "--secure-boot", "--loglevel", "warning"]


def make_vars(keys: KeySet, out: Path, *, template: Path = OVMF_VARS_TEMPLATE) -> Path:
    """An OVMF variable store with the key set enrolled and Secure Boot enforced (certificates only)."""
    if not template.exists():
        raise UserError(f"OVMF variable template {template} not found", hint=OVMF_HINT)
    for pair in keys.pairs:
        load_cert(pair.cert)
    with atomic_path(out) as tmp:
        run(virt_fw_vars_cmd(template, tmp, keys.pk.cert, keys.kek.cert, keys.db.cert, owner_guid(keys),
                             tool=virt_fw_vars()), capture=True)
    return out


class BootVerdict(enum.StrEnum):
    """What a console shows about Secure Boot so far (pure, over the console text)."""

    SECURE = "secure"  # the kernel says Secure Boot is on
    REFUSED = "refused"  # the firmware would not start the image
    UNDECIDED = "undecided"

    @classmethod
    def of(cls, console: str, markers: Sequence[str] = FIRMWARE_REFUSAL_MARKERS) -> BootVerdict:
        if KERNEL_SECURE_BOOT_LINE in console:
            return cls.SECURE
        if any(m in console for m in markers):
            return cls.REFUSED
        return cls.UNDECIDED
