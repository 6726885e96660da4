"""Every fact about a CPU architecture that factory uses, in one table.

Stages, the plan, the schema and the CLI ask this table; none of them keeps a list of
arches of its own, so a new arch is one row here (and its kernel package in its distro
family's module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# How firmware finds the boot code on a disk. A disk's methods follow from its partitions
# and its arch (factory.layouts); the stages branch on these, never on a layout's name.
BootMethod = Literal["bios-mbr", "bios-gpt", "uefi", "prep"]
BOOT_METHODS: tuple[BootMethod, ...] = ("bios-mbr", "bios-gpt", "uefi", "prep")

# What `factory boot` starts the firmware as: SeaBIOS (or the machine's own, e.g. SLOF on
# pseries), or UEFI without or with Secure Boot.
Firmware = Literal["bios", "uefi", "uefi-secureboot"]
FIRMWARES: tuple[Firmware, ...] = ("bios", "uefi", "uefi-secureboot")


@dataclass(frozen=True)
class Arch:
    """One architecture. `name` is Debian's; the rest is what each tool calls it."""

    name: str
    qemu_user: str  # the binfmt entry of qemu-user-static that runs its programs: qemu-NAME
    qemu_system: str  # the QEMU binary that boots it
    qemu_package: str  # the Debian package that has that binary
    machine: tuple[str, ...]  # QEMU's machine, memory and display arguments
    boot_methods: tuple[BootMethod, ...]  # what its firmware can boot, preferred first
    default_layout: str  # what layout "auto" means
    console: str  # the kernel command line's console
    grub: dict[BootMethod, str]  # grub platform of each boot method
    efi: str = ""  # the EFI removable-media suffix: BOOT{EFI}.EFI, shim{efi}.efi
    # UEFI firmware code and variable store per firmware kind, and their package.
    uefi: dict[Firmware, tuple[Path, Path]] = field(default_factory=dict)
    uefi_machine: tuple[str, ...] = ()  # machine arguments under UEFI
    uefi_package: str = ""
    grub_serial: bool = False  # grub itself talks on the serial port (x86's VGA is not read)
    kvm: bool = False  # KVM is worth probing when the host is this arch
    initramfs_modules: tuple[str, ...] = ()  # drivers a VM disk of this arch needs to boot
    oci: str = ""  # GOARCH, as OCI image configs name it
    oci_variant: str | None = None
    aci: str = ""  # appc's name
    kernel_args: tuple[str, ...] = ()  # more of the kernel command line, for any VM
    kernel_prefix: str = "vmlinuz"  # the kernel's file name in /boot
    elf: tuple[int, int] = (0, 0)  # its programs' ELF e_machine and EI_DATA (1: little-endian)

    def firmware(self, method: BootMethod) -> Firmware:
        """What boots a disk by `method`."""
        return "uefi" if method == "uefi" else "bios"

    def grub_platforms(self, methods: tuple[BootMethod, ...] | list[BootMethod]) -> list[str]:
        """The grub platforms the boot methods need, once each, in order."""
        return list(dict.fromkeys(self.grub[m] for m in methods))


OVMF = Path("/usr/share/OVMF")
AAVMF = Path("/usr/share/AAVMF")

ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            name="amd64",
            qemu_user="x86_64",
            qemu_system="qemu-system-x86_64",
            qemu_package="qemu-system-x86",
            machine=("-m", "1024", "-display", "none"),
            boot_methods=("uefi", "bios-gpt", "bios-mbr"),
            default_layout="mbr",
            console="console=tty0 console=ttyS0,115200",
            # Linux's IO-APIC timer check panics a guest whose host is too busy to
            # deliver the timer in time ("IO-APIC + timer doesn't work"; seen under TCG
            # on a loaded host): VM images turn it off, as Fedora's cloud images do.
            kernel_args=("no_timer_check",),
            grub={"bios-mbr": "i386-pc", "bios-gpt": "i386-pc", "uefi": "x86_64-efi"},
            efi="x64",
            # The .ms vars have Microsoft's keys enrolled and Secure Boot on: shim (signed
            # by Microsoft) → grub and kernel (signed by Debian) must verify or nothing boots.
            uefi={
                "uefi": (OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_VARS_4M.fd"),
                "uefi-secureboot": (OVMF / "OVMF_CODE_4M.ms.fd", OVMF / "OVMF_VARS_4M.ms.fd"),
            },
            uefi_machine=("-machine", "q35"),
            uefi_package="ovmf",
            grub_serial=True,
            kvm=True,
            initramfs_modules=(
                "ata_piix",
                "xen_blkfront",
                "hv_storvsc",
                "vmw_pvscsi",
                "mptspi",
                "atkbd",
            ),
            oci="amd64",
            aci="amd64",
            elf=(62, 1),
        ),
        Arch(
            name="arm64",
            qemu_user="aarch64",
            qemu_system="qemu-system-aarch64",
            qemu_package="qemu-system-arm",
            # pauth-impdef: pointer authentication by QEMU's own hash, cheaper to emulate
            # than the architected QARMA (not measured here); Linux uses either.
            machine=("-M", "virt", "-cpu", "max,pauth-impdef=on", "-m", "1024", "-display", "none"),
            boot_methods=("uefi",),
            default_layout="gpt-efi",
            console="console=ttyAMA0",
            grub={"uefi": "arm64-efi"},
            efi="aa64",
            # AAVMF: EDK2 for QEMU's virt machine; .ms vars have Microsoft's keys enrolled.
            uefi={
                "uefi": (AAVMF / "AAVMF_CODE.fd", AAVMF / "AAVMF_VARS.fd"),
                "uefi-secureboot": (AAVMF / "AAVMF_CODE.ms.fd", AAVMF / "AAVMF_VARS.ms.fd"),
            },
            uefi_package="qemu-efi-aarch64",
            initramfs_modules=("virtio_mmio",),
            oci="arm64",
            oci_variant="v8",
            aci="aarch64",
            elf=(183, 1),
        ),
        Arch(
            name="ppc64el",
            qemu_user="ppc64le",
            qemu_system="qemu-system-ppc64",
            qemu_package="qemu-system-ppc",
            machine=("-M", "pseries", "-m", "2048", "-nographic"),
            boot_methods=("prep",),
            default_layout="ppc-prep",
            console="console=hvc0",
            grub={"prep": "powerpc-ieee1275"},
            initramfs_modules=("ibmvscsi", "ibmvfc"),
            oci="ppc64le",
            aci="ppc64le",
            kernel_prefix="vmlinux",  # a plain ELF on POWER
            elf=(21, 1),
        ),
    )
}


class UnknownArch(ValueError):
    pass


def get(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise UnknownArch(f"unknown arch {name!r} (valid: {', '.join(ARCHES)})") from None


__all__ = ["ARCHES", "BOOT_METHODS", "FIRMWARES", "Arch", "BootMethod", "Firmware", "get"]
