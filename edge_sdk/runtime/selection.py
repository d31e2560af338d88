"""Build selection on the device: the rules of common.selection, for this machine by default."""

from __future__ import annotations

from collections.abc import Sequence

from common.manifest import BuildManifest
from common.protocol import DeviceProfile
from common.selection import Preference
from common.selection import choose_build as choose_for_profile
from edge_sdk.profile import detect_profile


def choose_build(
    manifests: Sequence[BuildManifest],
    profile: DeviceProfile | None = None,
    prefer: Preference = "balanced",
) -> BuildManifest:
    """The build this device should run (`profile` defaults to detect_profile()); see common.selection."""
    return choose_for_profile(manifests, profile or detect_profile(), prefer)
