"""Precomputed features of the frozen audio encoder: a crash-safe, content-addressed cache on disk
(:mod:`.cache`) and the loop that fills it (:mod:`.encode`, ``safe encode-audio``)."""
