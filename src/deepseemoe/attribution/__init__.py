"""Attribution graphs through the router: for one prompt, why each token went to the experts it went
to, what those experts wrote, and how that reached the predicted token.

    frozen.py   the linear replacement forward: attention patterns, norm scales, expert gates and
                routing weights held at their values on the prompt, every node's output cut from
                the gradient and re-entered at a zero "injection" tensor, so that one backward
                from a node gives its direct effect from every other node, exactly
    graph.py    nodes, edges (one backward per target node, batched), completeness, influence and
                pruning; `attribute` is the library function the verb calls
    export.py   the graph as circuit-tracer's graph JSON (what its frontend and Neuronpedia read),
                with routing and expert nodes as extra node types
"""
