"""Speech-driven lip sync: self-labelled targets from video (:mod:`avsr.lipsync.targets`: ARKit-named
mouth blendshapes from face-mesh landmarks)."""
