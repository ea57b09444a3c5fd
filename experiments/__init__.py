"""Research scripts (MIL benchmarks, DINO studies, detection on Cervix93): the lab notebook, apart from the product."""
