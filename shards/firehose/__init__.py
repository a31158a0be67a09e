"""The relay firehose, decoded and verified on the shard side.

frames.py reads a frame (and gives the supervisor its routing key), verify.py checks a commit or a
whole repository against its author's key (keys.py), over car.py, mst.py and datamodel.py. Nothing
here touches the network or the database; importing this package imports none of them."""
