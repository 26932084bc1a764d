"""Data layer: local data files with checksums, task rows, harmful sets, fine-tuning mixes
and prompt formatting. Nothing here touches the network unless a config asks for a hub
source explicitly."""

from cwac.data.examples import Example

__all__ = ["Example"]
