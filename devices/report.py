"""`edgeai devices` as data: the device profiles, and this machine described in their terms."""

from __future__ import annotations

from dataclasses import dataclass

from edgeai.devices import DeviceProfile, profiles
from edgeai.devices.detect import closest_profile
from edgeai.devices.detect import detect as detect_machine


@dataclass(frozen=True)
class DeviceReport:
    """What `edgeai devices` shows: every profile; with detection, this machine and its closest profile."""

    profiles: dict[str, DeviceProfile]
    machine: DeviceProfile | None = None  # this machine in the profiles' terms (detect=True)
    closest: DeviceProfile | None = None  # the profile nearest to it (`devices.detect.closest_profile`)
    distance: float | None = None  # how near: 0 is the same machine


def devices(*, detect: bool = False) -> DeviceReport:
    """The device profiles (`edgeai devices`); detect: also describe this machine (short memory and
    storage bandwidth probes) and name the closest profile."""
    if not detect:
        return DeviceReport(profiles())
    me = detect_machine()
    near, distance = closest_profile(me)
    return DeviceReport(profiles(), me, near, distance)
