"""Folding normalization layers into neighbouring conv/linear layers: pure maths, planning,
applying, the report, and the LayerNorm/GroupNorm affine folds."""
