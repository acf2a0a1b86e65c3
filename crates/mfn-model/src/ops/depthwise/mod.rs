//! Depthwise convs: [`DepthwiseConv2d`], the forward-only inference op with bias and PReLU
//! fused, and [`depthwise_conv2d`], the training op with its native backward. They share
//! no code: the inference kernel works on phase planes in row bands with folded
//! parameters, the training one keeps every sum in a fixed order so that gradients do not
//! depend on the thread count.

mod fused;
mod train;

pub use fused::DepthwiseConv2d;
pub use train::depthwise_conv2d;
pub(crate) use train::GraphConv;
