"""Which image names exist, for a clear ImageNotFound in every mode (no VM, no daemon)."""

from __future__ import annotations

from mvm.errors import ImageError, ImageNotFound
from mvm.images import manifest as manifests
from mvm.images.store import ImageStore


def known_images() -> list[str]:
    """Built images (names and aliases) and every preset (which mvmd builds on first use)."""
    names: set[str] = set()
    for img in ImageStore().all():
        names.add(img.name)
        names.update(img.aliases)
    for preset in manifests.preset_names():
        names.add(preset)
        try:
            m = manifests.load_preset(preset)
        except ImageError:
            continue
        names.add(m.name)
        names.update(m.aliases)
    return sorted(names)


def not_found(image: str, known: list[str] | None = None) -> ImageNotFound:
    known = known_images() if known is None else known
    return ImageNotFound(
        f"unknown image {image!r}; known images: {', '.join(known) or 'none'}",
        hint=(
            "use one of those names (python-3.12 is not available: no Debian suite "
            "mvm builds from ships it)"
            if image.startswith("python-3.")
            else "use one of those names, or build one with `mvmctl build`"
        ),
        image=image,
        known=known,
    )


def check(image: str) -> None:
    """ImageNotFound (listing the known names) unless ``image`` is one of them."""
    known = known_images()
    if image not in known:
        raise not_found(image, known)
