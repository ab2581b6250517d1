"""The workstation's private, encrypted, temporary study cache (DESIGN.md section 13).

`sealing` encrypts files, `store` keeps them bounded, `query` answers C-FIND from the
index, `fetch` fills a study through the relay, `prefetch` decides what to fill,
`control` lets `relay prefetch` and `relay cache` reach the running workstation.
"""
