"""Vigil's benchmark: scenario speeds as ratios against raw ceilings measured in the same run."""
