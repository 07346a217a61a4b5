"""The other curve builders: ways to add points to a run's curve besides stitching.

elastic (Once-for-All sub-networks), progressive (OFA's progressive shrinking), shrink (DMS), fold
(VanillaNet-style folding) and scaling (Fast Scaling's dWr rule), over subnet (elastic spaces).
"""
