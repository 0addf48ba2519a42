"""The build graph: turns recipes/ into doit tasks. All logic lives in pipeline/."""

from pathlib import Path

from pipeline import stages
from pipeline.cache import XXHashChecker, inputs_changed
from pipeline.recipes import DEFAULT_RECIPE
from pipeline.stages import BIOS_IMG, EXT4, INITRD, KERNEL, OS_RELEASE, TGZ, UEFI_IMG, Project

ROOT = Path(__file__).resolve().parent
P = Project(ROOT)
RECIPES = stages.recipes_or_exit(P)
STORE = P.store
BOOTABLE = [r for r in RECIPES.values() if r.bootable]
STORE.root.mkdir(exist_ok=True)  # doit keeps its state file in cache/

DOIT_CONFIG = {
    # the main job: every recipe's tgz, then the boot matrix of the default recipe
    "default_tasks": ["build_tgz"] + ([f"check_boot:{DEFAULT_RECIPE}"] if DEFAULT_RECIPE in RECIPES else []),
    "check_file_uptodate": XXHashChecker,
    "dep_file": str(ROOT / "cache" / "doit.db"),
    "backend": "json",
    "verbosity": 2,
    "action_string_formatting": "new",
}


def task_build_tgz():
    """Dockerfile (or [bootstrap] via mmdebstrap) -> cached rootfs tgz"""
    yield {"name": None, "doc": task_build_tgz.__doc__}
    for r in RECIPES.values():
        yield {
            "name": r.name,
            "doc": f"rootfs tgz of recipes/{r.name}",
            "actions": [(stages.build_tgz, [str(ROOT), r.name])],
            "file_dep": stages.recipe_files(r) + [str(STORE.pointer(p, TGZ)) for p in r.parents],
            "targets": [str(STORE.pointer(r.name, TGZ))],
            "uptodate": [inputs_changed(stages.tgz_inputs(r))],
            "clean": True,
        }


def _pointers(r, *artifacts):
    return [str(STORE.pointer(r.name, a)) for a in artifacts]


def _stage_task(r, func, file_dep, targets, inputs, doc):
    return {
        "name": r.name,
        "doc": doc,
        "actions": [(func, [str(ROOT), r.name])],
        "file_dep": file_dep,
        "targets": targets,
        "uptodate": [inputs_changed(inputs)],
        "clean": True,
    }


def _boot_files(r):
    return [KERNEL, OS_RELEASE] + ([INITRD] if r.initrd else [])


def task_extract_boot():
    """Kernel + initrd (+ os-release) out of the rootfs tgz"""
    yield {"name": None, "doc": task_extract_boot.__doc__}
    for r in BOOTABLE:
        yield _stage_task(r, stages.extract_boot, _pointers(r, TGZ), _pointers(r, *_boot_files(r)),
                          stages.stage_inputs(r, "boot"), f"kernel and initrd of {r.name}")


def task_build_rootfs():
    """ext4 root filesystem image of the tgz (rootless, reproducible)"""
    yield {"name": None, "doc": task_build_rootfs.__doc__}
    for r in BOOTABLE:
        yield _stage_task(r, stages.build_rootfs, _pointers(r, TGZ), _pointers(r, EXT4),
                          stages.stage_inputs(r, "ext4"), f"ext4 root image of {r.name}")


def task_build_syslinux_bios():
    """Raw MBR disk: Syslinux + kernel/initrd on FAT, the ext4 root as partition 2"""
    yield {"name": None, "doc": task_build_syslinux_bios.__doc__}
    for r in BOOTABLE:
        yield _stage_task(r, stages.build_syslinux_bios, _pointers(r, *_boot_files(r), EXT4),
                          _pointers(r, *stages.disk_outputs(r, BIOS_IMG)), stages.stage_inputs(r, "bios"),
                          f"BIOS disk image of {r.name}")


def task_build_efistub():
    """Raw GPT disk: ESP with a unified kernel image (systemd EFI stub), the ext4 root"""
    yield {"name": None, "doc": task_build_efistub.__doc__}
    for r in BOOTABLE:
        yield _stage_task(r, stages.build_efistub, _pointers(r, *_boot_files(r), EXT4),
                          _pointers(r, *stages.disk_outputs(r, UEFI_IMG)), stages.stage_inputs(r, "uefi"),
                          f"UEFI disk image of {r.name}")


RUN_PARAMS = [
    {"name": "memory", "long": "memory", "default": "", "help": "guest memory, e.g. 2G (default: recipe.toml)"},
    {"name": "cpus", "long": "cpus", "type": int, "default": 0, "help": "guest CPUs (default: recipe.toml)"},
    {"name": "cmdline", "long": "cmdline", "default": "", "help": "extra kernel command line (run_tgz only)"},
    {"name": "forward", "long": "forward", "default": "", "help": "host port forwards HOST:GUEST[,HOST:GUEST]"},
    {"name": "net", "long": "net", "inverse": "no-net", "type": bool, "default": True,
     "help": "user-mode networking (--no-net: none)"},
    {"name": "persist", "long": "persist", "default": "",
     "help": "keep changes in this disk file (a copy made on first use) instead of a throwaway snapshot"},
    {"name": "accel", "long": "accel", "default": "", "help": "kvm, tcg or auto (default: $LDT_ACCEL or auto)"},
]


def _run_tasks(mode, needs, doc):
    yield {"name": None, "doc": doc}
    for r in BOOTABLE:
        yield {
            "name": r.name,
            "doc": f"boot {r.name} ({mode}) on this terminal",
            "actions": [(stages.run_vm, [str(ROOT), r.name, mode])],
            "file_dep": _pointers(r, *needs(r)),
            "params": RUN_PARAMS,
            "uptodate": [False],
            "verbosity": 2,
        }


def task_run_tgz():
    """Boot with qemu -kernel/-initrd and the ext4 root, serial console on this terminal"""
    yield from _run_tasks("tgz", lambda r: [*_boot_files(r), EXT4], task_run_tgz.__doc__)


def task_run_bios():
    """Boot the Syslinux disk on SeaBIOS, serial console on this terminal"""
    yield from _run_tasks("bios", lambda r: [BIOS_IMG], task_run_bios.__doc__)


def task_run_uefi():
    """Boot the UEFI disk on OVMF (q35), serial console on this terminal"""
    yield from _run_tasks("uefi", lambda r: [UEFI_IMG], task_run_uefi.__doc__)


def task_check_boot():
    """Boot matrix: each mode headless to the boot marker; a table (passes cached per image)"""
    yield {"name": None, "doc": task_check_boot.__doc__}
    for r in (r for r in BOOTABLE if r.check):
        yield {
            "name": r.name,
            "doc": f"boot {r.name} in every mode to its marker",
            "actions": [(stages.check_boot, [str(ROOT), r.name])],
            "file_dep": _pointers(r, *_boot_files(r), EXT4, BIOS_IMG, UEFI_IMG),
            "uptodate": [False],
            "verbosity": 2,
        }


def task_store():
    """Show the content-hash store: entries, sizes, which recipe points where"""
    return {"actions": [(stages.show_store, [str(ROOT)])], "uptodate": [False], "verbosity": 2}


def task_store_gc():
    """Remove store entries no recipe points at, and unfinished work dirs"""
    return {"actions": [(stages.store_gc, [str(ROOT)])], "uptodate": [False], "verbosity": 2}
