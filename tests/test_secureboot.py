"""secureboot.py: key locations and checks, the command builders, signing, enrollment files and the
OVMF variable store, with the real openssl, sbsign and virt-fw-vars (each call well under a second)."""

from __future__ import annotations

import datetime
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from pipeline import secureboot as sb
from pipeline.errors import UserError
from pipeline.recipes import Recipe
from pipeline.secureboot import KeyPair, KeySet, Role

EPOCH = 1_700_000_000
STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")  # a small PE image to sign


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return sb.ensure_keys(env={}, directory=tmp_path_factory.mktemp("sb") / "keys")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return sb.ensure_keys(env={}, directory=tmp_path_factory.mktemp("sb-other") / "keys")


# ── where keys live (pure) ──────────────────────────────────────────────────────────────


def test_key_dir_is_per_user_outside_the_project() -> None:
    assert sb.key_dir({"HOME": "/home/u"}) == Path("/home/u/.local/share/ldt/secureboot")
    assert sb.key_dir({"HOME": "/home/u", "XDG_DATA_HOME": "/x"}) == Path("/x/ldt/secureboot")
    assert sb.key_dir({"HOME": "/home/u", "LDT_SB_DIR": "/k"}) == Path("/k")


def test_locate_prefers_environment_pairs() -> None:
    env = {"LDT_SB_DB_KEY": "/secrets/db.key", "LDT_SB_DB_CERT": "/secrets/db.crt"}
    ks = KeySet.locate(env, Path("/d"))
    assert ks.db == KeyPair(Role.DB, Path("/secrets/db.key"), Path("/secrets/db.crt"), from_env=True)
    assert ks.pk == KeyPair(Role.PK, Path("/d/PK.key"), Path("/d/PK.crt"))
    assert ks[Role.KEK].cert == Path("/d/KEK.crt")


def test_locate_key_without_certificate_is_one_line() -> None:
    with pytest.raises(UserError, match="LDT_SB_DB_KEY is set but LDT_SB_DB_CERT is not") as e:
        KeySet.locate({"LDT_SB_DB_KEY": "/k"}, Path("/d"))
    assert "LDT_SB_DB_CERT" in (e.value.hint or "")
    with pytest.raises(UserError, match="LDT_SB_PK_CERT is set but LDT_SB_PK_KEY is not"):
        KeySet.locate({"LDT_SB_PK_CERT": "/c"}, Path("/d"))


def test_roles() -> None:
    assert [str(r) for r in Role] == ["PK", "KEK", "db"]
    assert Role.DB.signer is Role.KEK and Role.KEK.signer is Role.PK and Role.PK.signer is Role.PK
    assert len({r.subject for r in Role}) == 3


# ── pure command builders ───────────────────────────────────────────────────────────────


def test_keygen_cmd() -> None:
    cmd = sb.keygen_cmd(Role.DB, Path("/d/db.key"), Path("/d/db.crt"))
    assert cmd[:3] == ["openssl", "req", "-new"]
    assert "rsa:2048" in cmd and "-nodes" in cmd and cmd[cmd.index("-days") + 1] == "3650"
    assert cmd[cmd.index("-subj") + 1] == "/CN=Linux Distro Tools Signature Database Key/"
    assert cmd[cmd.index("-keyout") + 1] == "/d/db.key" and cmd[-1] == "/d/db.crt"


def test_sbsign_cmd_freezes_the_clock_at_the_epoch() -> None:
    pair = KeyPair(Role.DB, Path("/k/db.key"), Path("/k/db.crt"))
    plain = sb.sbsign_cmd(pair, Path("in.efi"), Path("out.efi"))
    assert plain == ["sbsign", "--key", "/k/db.key", "--cert", "/k/db.crt", "--output", "out.efi", "in.efi"]
    assert sb.sbsign_cmd(pair, Path("in.efi"), Path("out.efi"), epoch=EPOCH) == [
        "faketime", "-f", "2023-11-14 22:13:20", *plain]


def test_the_frozen_clock_stands_still() -> None:
    """A big UKI takes sbsign over a second: the clock it reads must not move meanwhile."""
    from pipeline.run import run

    cmd = [*sb.frozen_clock_cmd(EPOCH), "sh", "-c", "date +%s; sleep 1.2; date +%s"]
    out = run(cmd, capture=True, env={"TZ": "UTC"}).stdout.decode().split()
    assert out == [str(EPOCH), str(EPOCH)]
    assert sb.sbverify_cmd(Path("/k/db.crt"), Path("x.efi")) == ["sbverify", "--cert", "/k/db.crt", "x.efi"]


def test_virt_fw_vars_cmd_enrolls_only_our_keys() -> None:
    import uuid

    g = uuid.UUID(int=1)
    cmd = sb.virt_fw_vars_cmd(Path("/t.fd"), Path("/o.fd"), Path("pk"), Path("kek"), Path("db"), g)
    assert cmd[:5] == ["virt-fw-vars", "--input", "/t.fd", "--output", "/o.fd"]
    assert cmd[cmd.index("--set-pk") + 1:cmd.index("--set-pk") + 3] == [str(g), "pk"]
    assert cmd[cmd.index("--add-kek") + 2] == "kek" and cmd[cmd.index("--add-db") + 2] == "db"
    assert "--no-microsoft" in cmd and "--secure-boot" in cmd


def test_boot_verdict() -> None:
    assert sb.BootVerdict.of("[    0.000000] secureboot: Secure boot enabled\n") is sb.BootVerdict.SECURE
    refused = 'BdsDxe: failed to load Boot0001 "UEFI QEMU HARDDISK" from PciRoot(0x0): Access Denied'
    assert sb.BootVerdict.of(refused) is sb.BootVerdict.REFUSED
    assert sb.BootVerdict.of("BdsDxe: loading Boot0001") is sb.BootVerdict.UNDECIDED


def test_esp_enrollment_paths() -> None:
    paths = sb.esp_enrollment_paths()
    assert paths["db.auth"] == "::/loader/keys/ldt/db.auth"
    assert paths["PK.cer"] == "::/EFI/keys/PK.cer"
    assert set(paths) == set(sb.ENROLL_FILES) and len(paths) == 9


def test_efi_structures() -> None:
    import uuid

    t = sb.efi_time(datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC))
    assert len(t) == 16 and t[:8] == bytes([0xE7, 0x07, 11, 14, 22, 13, 20, 0])
    esl = sb.signature_list(b"DER", uuid.UUID(int=0))
    assert len(esl) == 28 + 16 + 3 and esl[:16] == sb.EFI_CERT_X509_GUID.bytes_le
    payload = sb.auth_payload(Role.DB, t, esl)
    assert payload.startswith("db".encode("utf-16-le") + sb.EFI_IMAGE_SECURITY_DATABASE.bytes_le)
    auth = sb.auth_file(t, b"SIG", esl)
    assert auth[:16] == t and auth.endswith(b"SIG" + esl) and int.from_bytes(auth[16:20], "little") == 27


# ── keys, for real ──────────────────────────────────────────────────────────────────────


def test_ensure_keys_makes_private_files_once(keys: KeySet) -> None:
    d = keys.db.key.parent
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for pair in keys.pairs:
        assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
        assert not pair.from_env
    before = {p.role: sb.fingerprint(p.cert) for p in keys.pairs}
    again = sb.ensure_keys(env={}, directory=d)
    assert {p.role: sb.fingerprint(p.cert) for p in again.pairs} == before  # kept, not remade
    assert len(set(before.values())) == 3


def test_fingerprint_is_sha256_of_the_der_certificate(keys: KeySet) -> None:
    der = subprocess.run(["openssl", "x509", "-in", keys.db.cert, "-outform", "DER"], capture_output=True,
                         check=True).stdout
    assert sb.fingerprint(keys.db.cert) == hashlib.sha256(der).hexdigest()
    assert sb.owner_guid(keys) == sb.owner_guid(keys)


def test_keys_from_environment(keys: KeySet, tmp_path: Path) -> None:
    env = {"LDT_SB_DB_KEY": str(keys.db.key), "LDT_SB_DB_CERT": str(keys.db.cert)}
    got = sb.ensure_keys(env=env, directory=tmp_path / "k")
    assert got.db.from_env and sb.fingerprint(got.db.cert) == sb.fingerprint(keys.db.cert)
    assert not (tmp_path / "k" / "db.key").exists()  # no copy of a CI secret
    assert (tmp_path / "k" / "PK.key").exists()


def test_check_pair_missing_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"db key .*: private key .*db\.key not found"):
        sb.check_pair(KeyPair(Role.DB, tmp_path / "db.key", tmp_path / "db.crt"))


def test_check_pair_key_without_certificate(keys: KeySet, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has no certificate") as e:
        sb.check_pair(KeyPair(Role.DB, keys.db.key, tmp_path / "db.crt"))
    assert "LDT_SB_DB_CERT" in (e.value.hint or "")


def test_check_pair_not_a_certificate(keys: KeySet, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not an X.509 certificate") as e:
        sb.check_pair(KeyPair(Role.DB, keys.db.key, keys.db.key))  # the key given as the certificate
    assert "PRIVATE" not in str(e.value) + (e.value.hint or "")
    junk = tmp_path / "junk.crt"
    junk.write_bytes(b"hello")
    with pytest.raises(UserError, match="is not an X.509 certificate"):
        sb.check_pair(KeyPair(Role.DB, keys.db.key, junk))


def test_check_pair_mismatch(keys: KeySet) -> None:
    with pytest.raises(UserError, match="does not belong to certificate"):
        sb.check_pair(KeyPair(Role.DB, keys.db.key, keys.kek.cert))


def test_check_pair_expired(keys: KeySet) -> None:
    later = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)
    with pytest.raises(UserError, match=r"certificate .* expired on \d{4}-\d\d-\d\d") as e:
        sb.check_pair(keys.db, now=later)
    assert "new pair" in (e.value.hint or "")
    with pytest.raises(UserError, match="not valid before"):
        sb.check_pair(keys.db, now=datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))


def test_check_pair_not_a_key(keys: KeySet, tmp_path: Path) -> None:
    bad = tmp_path / "db.key"
    bad.write_text("not a key\n")
    with pytest.raises(UserError, match="is not a passphrase-less PEM private key"):
        sb.check_pair(KeyPair(Role.DB, bad, keys.db.cert))


# ── signing, for real ───────────────────────────────────────────────────────────────────


def test_signing_is_reproducible_for_the_same_epoch(keys: KeySet, other_keys: KeySet, tmp_path: Path) -> None:
    a = sb.sign(STUB, tmp_path / "a.efi", keys.db, epoch=EPOCH)
    b = sb.sign(STUB, tmp_path / "b.efi", keys.db, epoch=EPOCH)
    c = sb.sign(STUB, tmp_path / "c.efi", keys.db, epoch=EPOCH + 1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()  # sbsign stamps the (frozen) time: the epoch is an input
    assert sb.verify(a, keys.db.cert)
    assert not sb.verify(a, other_keys.db.cert)
    assert not sb.verify(STUB, keys.db.cert)


def test_secrets_never_reach_the_log(keys: KeySet, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDT_VERBOSE", "1")
    fresh = sb.ensure_keys(env={}, directory=tmp_path / "k")
    sb.sign(STUB, tmp_path / "s.efi", fresh.db, epoch=EPOCH)
    sb.enrollment_files(fresh, tmp_path / "enroll", epoch=EPOCH)
    with pytest.raises(UserError) as e:
        sb.check_pair(KeyPair(Role.DB, fresh.db.key, fresh.kek.cert))
    out, err = capfd.readouterr()
    shown = out + err + str(e.value) + (e.value.hint or "")
    assert "+ openssl req" in err and "faketime -f '2023-11-14 22:13:20' sbsign --key" in err  # verbose: key paths
    for pair in fresh.pairs:
        body = pair.key.read_text().splitlines()[1]  # a line of the key's base64
        assert body not in shown
    assert "PRIVATE KEY" not in shown


def test_sb_keys_task_shows_paths_and_the_fingerprint_never_a_key(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`doit sb_keys`: makes the keys the first time (verbose: every command echoed), then shows where
    they are and the db certificate's fingerprint; no byte of a private key on either stream."""
    from pipeline import graph

    monkeypatch.setenv("LDT_VERBOSE", "1")
    monkeypatch.setenv("LDT_SB_DIR", str(tmp_path / "k"))
    for role in Role:
        monkeypatch.delenv(role.env_key, raising=False)
        monkeypatch.delenv(role.env_cert, raising=False)
    assert graph.sb_keys_action(str(tmp_path)) is None  # None: the task passed
    assert graph.sb_keys_action(str(tmp_path)) is None  # the second time: nothing made
    out, err = capfd.readouterr()
    keys = KeySet.locate({}, tmp_path / "k")
    assert err.count("made the Secure Boot db key pair") == 1 and "+ openssl req" in err
    assert f"db: key {keys.db.key}, certificate {keys.db.cert}" in out
    assert f"db certificate SHA-256 fingerprint: {sb.fingerprint(keys.db.cert)}" in out
    for pair in keys.pairs:
        for line in pair.key.read_text().splitlines()[1:-1]:
            assert line not in out + err
    assert "PRIVATE KEY" not in out + err


# ── enrollment files and firmware, for real ─────────────────────────────────────────────


def test_enrollment_files(keys: KeySet, tmp_path: Path) -> None:
    from virt.firmware.efi import efivar, siglist

    a = sb.enrollment_files(keys, tmp_path / "a", epoch=EPOCH)
    b = sb.enrollment_files(keys, tmp_path / "b", epoch=EPOCH)
    assert sorted(a) == sorted(sb.ENROLL_FILES)
    assert all(a[n].read_bytes() == b[n].read_bytes() for n in a)  # reproducible
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(sb.ENROLL_FILES)  # no leftovers
    assert a["db.cer"].read_bytes() == sb.cert_der(keys.db.cert)
    db = siglist.EfiSigDB(a["db.esl"].read_bytes())
    assert db[0][0]["data"] == sb.cert_der(keys.db.cert) and db[0][0]["guid"] == sb.owner_guid(keys)
    for role in Role:
        blob = a[f"{role}.auth"].read_bytes()
        var = efivar.EfiVar(str(role), authdata=blob)  # virt-firmware reads it as an authenticated write
        assert bytes(var.data) == a[f"{role}.esl"].read_bytes()
        # the PKCS#7 is by the signer's key over name || guid || attrs || time || esl
        stamp, sig_len = blob[:16], int.from_bytes(blob[16:20], "little") - 24
        sig = tmp_path / f"{role}.p7"
        sig.write_bytes(blob[40:40 + sig_len])
        payload = tmp_path / f"{role}.payload"
        payload.write_bytes(sb.auth_payload(role, stamp, a[f"{role}.esl"].read_bytes()))
        verify = ["openssl", "smime", "-verify", "-binary", "-inform", "DER", "-in", sig, "-content", payload,
                  "-noverify", "-out", os.devnull, "-certfile"]
        ok = subprocess.run([*verify, keys[role.signer].cert], capture_output=True)
        assert ok.returncode == 0, ok.stderr
        assert b"BEGIN" not in blob


def test_make_vars_enrolls_our_keys_and_enforces(keys: KeySet, tmp_path: Path) -> None:
    from virt.firmware.varstore import edk2

    a = sb.make_vars(keys, tmp_path / "a.fd")
    b = sb.make_vars(keys, tmp_path / "b.fd")
    assert a.read_bytes() == b.read_bytes()  # same keys -> the same vars file
    assert a.stat().st_size == sb.OVMF_VARS_TEMPLATE.stat().st_size
    varlist = edk2.Edk2VarStore(str(a)).get_varlist()
    assert bytes(varlist["SecureBootEnable"].data) == b"\x01"
    for role in Role:
        entries = siglist_certs(bytes(varlist[str(role)].data))
        assert entries == [sb.cert_der(keys[role].cert)]  # ours only: no Microsoft, no distro keys


def siglist_certs(data: bytes) -> list[bytes]:
    from virt.firmware.efi import siglist

    return [entry["data"] for sl in siglist.EfiSigDB(data) for entry in sl]


def test_make_vars_without_template(keys: KeySet, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="OVMF variable template .* not found"):
        sb.make_vars(keys, tmp_path / "v.fd", template=tmp_path / "none.fd")
    assert not (tmp_path / "v.fd").exists()


# ── booting a signed disk (vm.py) ────────────────────────────────────────────────────────


def test_a_signed_disk_boots_on_the_variables_beside_it(tmp_path: Path) -> None:
    from pipeline import qemu, vm

    entry = tmp_path / "store" / "uefi" / "k"
    entry.mkdir(parents=True)
    (entry / "uefi.img").touch()
    settings = qemu.VmSettings(accel=qemu.Accel.TCG)
    b = vm.Boot(entry / "uefi.img")
    assert vm.machine(qemu.Mode.UEFI, b, settings).secure_vars is None  # unsigned: plain OVMF
    (entry / "sb-vars.fd").touch()
    m = vm.machine(qemu.Mode.UEFI, b, settings, persistent=tmp_path / "copy.img")
    assert m.secure_vars == entry / "sb-vars.fd" and m.disk == tmp_path / "copy.img"
    r = Recipe(name="x", dir=tmp_path)
    assert vm.expect(m, r) is vm.SECURE_BOOT and vm.SECURE_BOOT.require[0].search(sb.KERNEL_SECURE_BOOT_LINE)
    verity_recipe = Recipe(name="x", dir=tmp_path, verity=True)
    assert len(vm.expect(m, verity_recipe).require) == 2 and vm.notes(m, verity_recipe) == "; secure boot; verity root"
    assert vm.machine(qemu.Mode.BIOS, vm.Boot(entry / "uefi.img"), settings).secure_vars is None


def test_a_refusal_is_one_line_and_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import kvm, qemu, vm
    from pipeline.project import Project
    from pipeline.recipes import Recipe

    def check_one(p, r, mode, accel):
        if mode is qemu.Mode.UEFI:
            return vm.CheckResult(mode, False, 4.2, cached=False, refused=True, tail=("lots", "of", "lines"),
                                  reason="the firmware refused the image: BdsDxe: failed to load Boot0001: "
                                         "Access Denied")
        return vm.CheckResult(mode, True, 30.0, cached=True, passed_by="login prompt")

    monkeypatch.setattr(vm, "check_one", check_one)
    monkeypatch.setattr(kvm, "select_accel", lambda **kw: kvm.AccelChoice(qemu.Accel.TCG, "test"))
    r = Recipe(name="signed", dir=tmp_path, secure_boot=True)
    with pytest.raises(UserError) as info:
        vm.check_boot(Project(tmp_path, extra=(r,)), r)
    assert "\n" not in info.value.message and "lots" not in info.value.message
    assert info.value.message == ("signed: uefi: the firmware refused the image: BdsDxe: failed to load Boot0001: "
                                  "Access Denied")
