"""The baselines SeqLoRA is compared with, as strategies the method registry points at.

``fusion``: Mix-of-Show-style least-squares fusion at composition. ``frozen_slots``: Orthogonal
Adaptation's fixed disjoint basis slots. Same layer as ``seqlora_core.method``: torch only.
"""
