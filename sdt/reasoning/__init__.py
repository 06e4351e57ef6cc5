"""Self-braking reasoning, on top of evaluation: the accuracy and overthinking evaluation of a fine-tuned
checkpoint (`evaluate`) and its figures (`plot`). The task's data (examples, answers, traces, braking) is
`sdt.data.reasoning`."""
