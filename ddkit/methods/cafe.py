"""CAFE (Wang et al., CVPR 2022) -- being written."""
