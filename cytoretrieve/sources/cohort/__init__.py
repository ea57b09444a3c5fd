"""The cohort around the slides: the slide labels CSV (`labels`) and slide -> fold splits (`split`, the one reader
for every split format)."""
