"""The passes over a Dynamo graph: ``analysis`` (find what can be cached, without changing the
graph; ``ANALYSIS_PASSES``) then ``rewrite`` (turn the analysed copy into cache-or-compute
pieces; ``REWRITE_PASSES``). Each package holds its ordered pass list; every pass is a small
function of one signature that says what it did in the result's log."""
