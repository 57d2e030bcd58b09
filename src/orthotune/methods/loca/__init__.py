"""LoCA: the method (:mod:`.loca`) and its location-learning schedule (:mod:`.schedule`)."""
