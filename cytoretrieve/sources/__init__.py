"""Where images and features come from: cell datasets (`cells`), whole slides (`slides`), the cohort's slide
labels and splits (`cohort`). Sources list and read; they yield rows and never write the store."""
