"""The flows and the machinery they share.

`routing` maps a notification to its flow; `paging`, `grants`/`sends` (on `ledger`) and
`sweeper` are the machinery; each flow module (`scheduled_bonus`, `realtime_bonus`,
`realtime_send`) reads like its Optimove sequence diagram.
"""
