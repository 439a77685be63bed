"""Features: the backbone registry, decoding, the colour-morphology extractor, the
catalog, augmentation, synthetic cells and the join of vectors. No Prefect, no Ray.
"""
